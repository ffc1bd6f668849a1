#!/usr/bin/env python3
"""Receive Kaspersky CyberTrace events over TCP and print them.

CyberTrace connects to this listener (its OutputSettings > ConnectionString)
and sends detection events and service alerts, each ending with a newline.
Every event is printed whole, as it arrives; nothing a peer sends can stop
the listener, and Ctrl+C or SIGTERM first writes out what was received.

The file, top to bottom:

- Shared: all that send_events_cybertrace.py and fake_cybertrace.py
  import (framing, fields, escaping, addresses, numbers in words,
  command-line pieces, the console and its live line, the embedded
  listener of the lab check).
- Formats: raw, text and JSON Lines (JsonFormatter and its plans).
- Output: where events go, whole (Output), and the sink that counts them
  and stops at --count (EventSink).
- The counters: the live line, --stats and SIGUSR1 (Stats).
- Settings and the command line.
- Peers: who is let in (Admission), one peer's socket, framing and
  deadlines (Connection), the memory of unfinished events (BufferBudget),
  reading peers into the sink (Reader), closing connections past their
  time and making room for waiting peers (Sweeper), the listening socket.
- Listener: the loop, its timers and signals, accepting, each peer's turn,
  the drain on stop.
- main().
"""

from __future__ import annotations

import argparse
import collections
import errno
import functools
import io
import ipaddress
import json
import operator
import os
import re
import select
import selectors
import signal
import socket
import stat
import struct
import sys
import threading
import time
from typing import Callable, Iterator, Optional, Union

__version__ = "1.1.0"

# What a read yields: bytes, or a view into a receive buffer.
Block = Union[bytes, bytearray, memoryview]
IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

LISTEN_ADDR = "127.0.0.1"
LISTEN_PORT = 9998
# Large reads keep the per-event cost in C: one recv, one split and one write
# serve a thousand events.  Not larger: the events of one read must fit in
# one of Python's 1 MiB small-object arenas, which is then kept for the next
# read; more, and an arena is unmapped and mapped anew (page faults) each
# time.
RECV_SIZE = 512 * 1024
# JSON costs a few microseconds an event, so its reads are smaller: a read's
# events are formatted at once, and this many take about half a millisecond,
# which is how long another peer's events may wait; the cost of a read is
# lost in the formatting.
JSON_RECV_SIZE = 64 * 1024
MAX_EVENT_BYTES = 1024 * 1024
# A lone busy peer keeps its turn while its reads fill the buffer and
# nothing else waits; with several peers each gets one read a round, sized
# by what its bytes cost (FairShare), and another peer's events wait one
# read at most.
READS_PER_TURN = 8
# The kernel sizes each connection's receive buffer by the rate it sees on
# that connection alone: with several busy peers each stays near 128 KiB, a
# read finds under 100 KiB, and every byte costs more calls and ACKs.  2 MiB
# lets a peer's data pile up into full reads while the others take their
# turns, and covers what loopback and LAN links keep in flight (10 Gbit/s
# with a millisecond's round trip: 1.25 MB).
RECV_BUFFER = 2 * 1024 * 1024
MAX_CONNECTIONS = 512
# How much of a peer's address --max-per-host counts as one host: one
# IPv4 address, but an IPv6 /64, since one machine commonly holds a whole
# /64 and can pick a new address for every connection.
PER_HOST_PREFIX = (32, 64)
# When every connection is taken and a peer waits, the one silent longest
# gives its place, if silent this long: idle peers cannot shut others out,
# and one that is only between two events keeps its place.
EVICT_IDLE_SECONDS = 2.0
# An event unfinished this long after its first byte closes its connection:
# a peer trickling a byte now and then (slowloris) cannot hold a place by
# never going idle.  nginx gives a request's header as long by default.
EVENT_TIMEOUT = 60.0
# Every peer may hold an event of up to MAX_EVENT_BYTES without its newline:
# 512 such peers would hold half a GiB.  Past this budget for them all, the
# largest held events go out in pieces instead.
MAX_BUFFER_BYTES = 64 * 1024 * 1024
# select(), the only selector on Windows, watches at most 512 sockets there
# (CPython's FD_SETSIZE), the listening and signal sockets included.
WINDOWS_SELECT_SOCKETS = 512
# Bounds of the numbers on the command line: past them a number is a slip,
# and would overflow a timer (select() takes at most 2**31 ms) or an
# allocation (the receive buffer holds an event).
SECONDS = (0.01, 10000000.0)
MAX_CONNECTIONS_LIMIT = 100000
MAX_EVENT_BYTES_LIMIT = 64 * 1024 * 1024
MAX_BUFFER_BYTES_LIMIT = 1 << 40
COUNT_LIMIT = 10 ** 15
# What a pipe we write to is asked to hold: Linux lets anyone have 1 MiB
# (/proc/sys/fs/pipe-max-size).
PIPE_SIZE = 1024 * 1024
PAGE = 4096
# Output files are created for their owner and group only: detections name
# hosts, users and what they did (as rsyslog's $FileCreateMode 0640).
FILE_MODE = 0o640
# As syslog-ng's unix-stream(): any local user may connect, as any local
# user may connect to the default loopback TCP address.
SOCKET_MODE = 0o666
UNIX_PREFIX = "unix:"
# While the output stalls, so many formatted bytes wait at most; the events
# after them wait as received (held within --max-buffer-bytes, as peers stop
# being read), for JSON can make an event six times its size.
OUTPUT_BACKLOG = 1024 * 1024
# How often an event waiting for room in a pipe looks for it: select() says
# a pipe is writable once a single page is free.
ROOM_POLL_SECONDS = 0.01
# The loop wakes at least this often, whatever its timers say: a wait of
# days would overflow select() (2**31 ms at most).
LONGEST_WAIT = 60.0
# At most this many "Rejected" lines every REJECT_WINDOW seconds; the rest
# are counted in one line, as rsyslog's rate limiting does.
REJECT_LINES = 5
REJECT_WINDOW = 10.0
# So many "Connection from" and "Closed" lines a window, at most.
CONNECTION_LINES = 100
# So many "split into pieces" warnings a window: a peer sending one long
# event after another must not flood the log either.
SPLIT_LINES = 5
# Out of file descriptors, try for one again this long after.
DESCRIPTOR_RETRY_SECONDS = 0.5
# Time allowed on stop to read what the kernel already acknowledged to peers:
# they count it as delivered, yet a stop must not wait on a peer for ever.
DRAIN_SECONDS = 2.0
# Stopping, a peer silent this long after our FIN is taken to be done.
DRAIN_QUIET_SECONDS = 0.25
# The live status line on a terminal is redrawn at most this often: as pv's,
# often enough to look alive, seldom enough to cost nothing.
LIVE_SECONDS = 0.25
FORMATS = ("text", "raw", "json")
# What --prefix can put before each event of raw and text.
PREFIX_FIELDS = ("time", "peer", "listen")
# The signals the loop acts on, by name: a platform lacks some (Windows has
# no SIGHUP or SIGUSR1, and Ctrl+Break raises SIGBREAK, which only it has),
# so they are looked up by name (signal_numbers(), getattr), never assumed.
LOOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGBREAK", "SIGHUP", "SIGUSR1")
# accept() fails with these when descriptors run out (WSAEMFILE: Windows).
OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE,
                      getattr(errno, "WSAEMFILE", errno.EMFILE))


# --- Shared with send_events_cybertrace.py and fake_cybertrace.py ------------
#
# All they import is below, but for these constants from the top of the
# file: LISTEN_ADDR, LISTEN_PORT, RECV_SIZE, LIVE_SECONDS, SECONDS and
# OUT_OF_DESCRIPTORS.

class UserError(Exception):
    """An error the user can fix; printed as one line, exit status 1."""


class ArgumentError(UserError):
    """An argument found wrong only once used (an --allow that the listening
    socket can never match); printed as one line, exit status 2."""


# EventFramer.marks when no event was cut into pieces.
NO_MARKS = ()


class EventFramer:
    """Cut a byte stream into events at b"\\n", holding at most one event.

    Each call returns a block of whole events, each ending with exactly one
    b"\\n" and without the b"\\r" that may precede it; events longer than
    max_event_bytes come out as several pieces of at most that size.  A
    block is bytes, or a memoryview of the caller's buffer when nothing had
    to change (no copy: the caller uses it before reading again).

    After each call, marks lists the pieces in the block it returned, as
    (line number in the block, piece number from 1, whether it is its
    event's last piece); mostly it is empty.
    """

    def __init__(self, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self.max_event_bytes = max_event_bytes
        self.pending = b""
        self.received = 0
        self.split_events = 0
        self.piece = 0  # pieces of the pending event emitted so far
        self.marks = NO_MARKS

    def read(self, readinto, buffer: bytearray, size: int = RECV_SIZE):
        """Read once with readinto after the pending bytes; None at EOF.

        buffer must hold the pending event and size more bytes; the
        listener shares one such buffer between all its connections.
        """
        held = len(self.pending)
        if held + size > len(buffer):  # only without a size limit
            buffer = bytearray(held + size)
        view = memoryview(buffer)
        view[:held] = self.pending
        got = readinto(view[held:held + size])
        if not got:
            return None
        self.received += got
        return self.frame(buffer, held + got)

    def feed(self, data: bytes):
        """Add received bytes; return the events they complete."""
        self.received += len(data)
        buf = self.pending + data if self.pending else data
        return self.frame(buf, len(buf))

    def frame(self, buf, total: int):
        """Frame buf[:total], which starts with the pending bytes."""
        end = buf.rfind(b"\n", 0, total) + 1
        view = memoryview(buf)
        self.marks = NO_MARKS
        if end == 0:
            self.pending = bytes(view[:total])
            return self._cut_pending()
        self.pending = bytes(view[end:total])
        block = view[:end]
        if buf.find(b"\r", 0, end) >= 0:
            block = bytes(block).replace(b"\r\n", b"\n")
        # Only the first line holds bytes from before; every other line is
        # no longer than what this read brought.  Mostly, neither is long.
        first = buf.find(b"\n", 0, end)
        if max(first, end - first - 1) > self.max_event_bytes:
            block = self._cut_block(bytes(block))
        elif self.piece:
            self.marks = [(0, self.piece + 1, True)]
        self.piece = 0
        if len(self.pending) > self.max_event_bytes + 1:
            block = bytes(block)
            block += self._cut_pending(block.count(b"\n"))
        return block

    def close(self) -> bytes:
        """Return the last event, which had no newline, if there is one."""
        rest, self.pending = self.pending, b""
        self.marks = NO_MARKS
        if not rest:
            return b""
        if len(rest) > self.max_event_bytes:
            return self._cut_block(rest + b"\n")
        if self.piece:
            self.marks = [(0, self.piece + 1, True)]
            self.piece = 0
        return rest + b"\n"

    def release(self) -> bytes:
        """Give up the pending bytes as a piece of their event, with b"\\n"."""
        # The last byte stays, so that the event's last piece is not empty
        # when its b"\n" comes next; a b"\r" stays with it, lest its
        # b"\n" make it a piece of its own.
        keep = 2 if self.pending.endswith(b"\r") else 1
        piece = self.pending[:len(self.pending) - keep]
        self.marks = NO_MARKS
        if not piece:
            return b""
        self.pending = self.pending[len(piece):]
        if not self.piece:
            self.split_events += 1
        self.piece += 1
        self.marks = [(0, self.piece, False)]
        return piece + b"\n"

    def _cut_pending(self, first_line: int = 0) -> bytes:
        # Keep one byte beyond the limit: it may be the b"\r" of a b"\r\n"
        # still in flight, which must not become an event of its own.
        size = self.max_event_bytes
        if len(self.pending) <= size + 1:
            return b""
        if not self.piece:
            self.split_events += 1
        # Sliced by index: taking a piece off the front each time copies
        # the rest, quadratic when the pieces are small.  The pieces leave
        # 2 to size + 1 bytes pending.
        pending = self.pending
        count = (len(pending) - 2) // size
        pieces = [pending[i:i + size] for i in range(0, count * size, size)]
        self.pending = pending[count * size:]
        marks = list(self.marks)
        marks.extend((first_line + number, self.piece + number + 1, False)
                     for number in range(count))
        self.marks = marks
        self.piece += count
        pieces.append(b"")
        return b"\n".join(pieces)

    def _cut_block(self, block: bytes) -> bytes:
        size = self.max_event_bytes
        lines = block.split(b"\n")
        lines.pop()
        out = []
        marks = []
        for index, line in enumerate(lines):
            # The first line may end an event whose pieces came before.
            before = self.piece if index == 0 else 0
            if len(line) <= size:
                if before:
                    marks.append((len(out), before + 1, True))
                out.append(line)
                continue
            if not before:
                self.split_events += 1
            count = (len(line) + size - 1) // size
            marks.extend((len(out) + number, before + number + 1,
                          number == count - 1) for number in range(count))
            out.extend(line[i:i + size] for i in range(0, len(line), size))
        self.piece = 0
        self.marks = marks
        out.append(b"")
        return b"\n".join(out)


def split_lines(block: Block) -> list:
    """Return a block's events, each with its b"\\n"."""
    # BytesIO finds line ends with memchr: four times faster than
    # bytes.count(b"\\n") or bytes.split(b"\\n"), which test every byte.
    return io.BytesIO(block).readlines()


def chunk_receive(connection: socket.socket,
                  size: int = RECV_SIZE) -> Iterator[bytes]:
    """Yield data from the connection until the peer closes it."""
    while True:
        data = connection.recv(size)
        if not data:
            return
        yield data


def receive_blocks(connection: socket.socket, first: bytes = b"",
                   max_event_bytes: int = MAX_EVENT_BYTES,
                   size: int = RECV_SIZE) -> Iterator[bytes]:
    """Yield blocks of whole events (bytes) until the peer closes; first
    is what was already read from the connection."""
    framer = EventFramer(max_event_bytes)
    chunks = chunk_receive(connection, size)
    if first:
        block = framer.feed(first)
        if block:
            yield bytes(block)
    for data in chunks:
        block = framer.feed(data)
        if block:
            yield bytes(block)
    block = framer.close()
    if block:
        yield block


def parse_response(connection: socket.socket,
                   max_event_bytes: int = MAX_EVENT_BYTES) -> Iterator[bytes]:
    """Yield each event received on the connection, without its newline."""
    for block in receive_blocks(connection, max_event_bytes=max_event_bytes):
        yield from block[:-1].split(b"\n")


# A key starts the line or follows a space or "|", and ends at "=".
# White space is ASCII's only, so that text and bytes (the JSON fast path)
# are cut alike.
_FIELD_SPLIT = re.compile(r"(?:^|[ |])([^\s|=]+)=", re.ASCII)
# A value ends before the white space that precedes the next key or the end
# of the event: "k=a  b   c=d" gives "a  b".  The event keeps every byte.
_WHITE = " \t\n\r\x0b\x0c"


def parse_fields(event: str) -> dict:
    """Return the event's key=value pairs; a repeated key gets a list."""
    return group_fields(*split_pairs(event))


def split_pairs(text: str, cut: bool = False) -> tuple:
    """Return (keys, values) of text's key=value pairs; cut: text is the
    start of an event, and its last pair may run on past it (left out)."""
    parts = _FIELD_SPLIT.split(text)
    end = len(parts) - 2 * cut
    return parts[1:end:2], [value.rstrip(_WHITE)
                            for value in parts[2:end + 1:2]]


def group_fields(keys: list, values: list) -> dict:
    """Return keys and their values as a dict; a repeated key gets a list."""
    fields = dict(zip(keys, values))
    if len(fields) == len(keys):
        return fields
    # Three times quicker than testing each key's value for a list: an
    # event of 16,000 "k=v" took 5 ms that way.
    lists = collections.defaultdict(list)
    for key, value in zip(keys, values):
        lists[key].append(value)
    return {key: found[0] if len(found) == 1 else found
            for key, found in lists.items()}


# --- What an event is: CyberTrace's templates --------------------------------
#
# Kaspersky ships templates for each SIEM (online help 197106, 296063): the
# default key=value one, ArcSight's CEF, RSA NetWitness's with a syslog
# <PRI> first, KUMA's with "|" between fields.  read_event() reads them all
# into (kind, fields), for -f json and the lab check alike.

# The marker of the event CyberTrace sends after each event it looked up
# (X-KF-SendFinishedEvent): one of its fields is "LookupFinished" (296063).
# Looked for anywhere in the event, first, since such an event may quote
# the event it answers.
FINISHED = b"LookupFinished"
_FINISHED_TEXT = FINISHED.decode()
_ALERT = re.compile(r"(?<![\w.])alert=(KL_ALERT_\w+)")
# A shape (keys, as _SHAPE finds them) with a key that _ALERT's "alert="
# can end: on the JSON fast path, where values hold no "=", only such a
# key can make an event an alert.
_ALERT_KEY = re.compile(rb"(?:^|[^\w.])alert=")
# What a detection's template names its matched indicator: the default
# template's key, and KUMA's.
DETECTION_KEYS = ("matchedIndicator", "MatchedIndicator")
# CEF's Device Event Class ID and Name in Kaspersky's ArcSight templates.
CEF_KINDS = {"CyberTrace Service Event": "alert", "1": "alert",
             "CyberTrace Detection Event": "detection", "2": "detection"}
KINDS = ("detection", "alert", "finished", "unknown")
# Fields are read from an event's first 16 Ki characters, as far as a JSON
# plan serves: no CyberTrace template comes near (a detection with its
# record's context is a few KiB; rsyslog takes 8 KiB messages by default),
# and reading fields costs 30 to 90 ns a character: a 1 MiB event read
# whole held every other peer up for tens of milliseconds, its first 64 Ki
# still for 8 ms.
FIELDS_CHARS = 16 * 1024
# A syslog priority, as RSA NetWitness's template begins:
# "<232>%CyberTrace:ALERT_EVENT alert=...".
_PRI = re.compile(r"<(\d{1,3})>")
# ArcSight's names for CEF's seven header fields, in their order.
CEF_HEADER = ("cefVersion", "deviceVendor", "deviceProduct", "deviceVersion",
              "deviceEventClassId", "name", "severity")
# CEF: at the start (after a <PRI>), or after a syslog header of words
# ("Sep 19 08:26:10 host CEF:0|..."); each header field ends at a "|" that
# no backslash escapes.
_CEF = re.compile(r"(?:[^|=]* )?CEF:" + r"((?:[^|\\]|\\.)*)\|" * 7,
                  re.DOTALL)
_CEF_HEADER_ESCAPE = re.compile(r"\\([|\\])")
# In the extension, pairs are separated by spaces only ("|" is text there),
# and a key never holds a backslash, so an escaped "\=" ends no key.
_CEF_KEY = re.compile(r"(?:^| )([^\s|=\\]+)=", re.ASCII)
_CEF_VALUE_ESCAPE = re.compile(r"\\([\\=nr])")
_CEF_UNESCAPED = {"\\": "\\", "=": "=", "n": "\n", "r": "\r"}


def alert_name(event: str) -> Optional[str]:
    """Return the service alert an event is (KL_ALERT_...), or None."""
    # The look-behind keeps sre from looking for "alert=" at memchr's speed:
    # a 1 MiB event took 10 ms.
    if "alert=KL_ALERT_" not in event:
        return None
    found = _ALERT.search(event)
    return found.group(1) if found else None


def read_event(event: str) -> tuple:
    """Return (kind, fields) for an event of any of CyberTrace's templates.

    fields: a leading syslog <PRI> as "pri", a CEF header by ArcSight's
    names (CEF_HEADER) and its extension un-escaped, or else the event's
    key=value pairs; a key that repeats gets a list.  kind: see event_kind.
    Fields are read from the first FIELDS_CHARS characters of a longer
    event, less the last, which may go on past them.
    """
    cut = len(event) > FIELDS_CHARS
    text = event[:FIELDS_CHARS] if cut else event
    pri = _PRI.match(text) if text[:1] == "<" else None
    if pri:
        text = text[pri.end():]
    header = _CEF.match(text) if "CEF:" in text else None
    keys, values = (["pri"], [pri.group(1)]) if pri else ([], [])
    if header is None:
        pairs = split_pairs(text, cut)
        fields = group_fields(keys + pairs[0], values + pairs[1])
        return event_kind(event, fields), fields
    head = [_CEF_HEADER_ESCAPE.sub(r"\1", value) for value in header.groups()]
    parts = _CEF_KEY.split(text[header.end():])
    keys += [*CEF_HEADER, *parts[1:len(parts) - 2 * cut:2]]
    values += head
    values += [unescape_cef(value.rstrip(_WHITE))
               for value in parts[2:len(parts) - cut:2]]
    fields = group_fields(keys, values)
    # Name first: a site may number its classes, not name them anew.
    return event_kind(event, fields, (head[5], head[4])), fields


def unescape_cef(value: str) -> str:
    """Undo CEF's escapes in an extension's value: \\\\ \\= \\n \\r."""
    if "\\" not in value:
        return value
    return _CEF_VALUE_ESCAPE.sub(lambda m: _CEF_UNESCAPED[m.group(1)], value)


def event_kind(event: str, fields: dict, cef: tuple = ()) -> str:
    """Return what an event is: "finished" (it holds LookupFinished),
    "alert" (alert=KL_ALERT_...), "alert" or "detection" by a CEF header's
    Name or Device Event Class ID (cef: those two, un-escaped), "detection"
    (a matched indicator's key), or "unknown"."""
    if _FINISHED_TEXT in event:
        return "finished"
    if alert_name(event) is not None:
        return "alert"
    for value in cef:
        kind = CEF_KINDS.get(value)
        if kind is not None:
            return kind
    for key in DETECTION_KEYS:
        if key in fields:
            return "detection"
    return "unknown"


def _control_escapes() -> dict:
    """Map characters that steer a terminal to visible escapes."""
    table = {}
    codes = [*range(0x00, 0x20), *range(0x7F, 0xA0),
             0x2028, 0x2029, *range(0x202A, 0x202F), *range(0x2066, 0x206A)]
    for code in codes:
        table[code] = "\\x%02x" % code if code < 0x100 else "\\u%04x" % code
    del table[ord("\t")], table[ord("\n")]
    return table


_TERMINAL_ESCAPES = _control_escapes()
_LINE_ESCAPES = {**_TERMINAL_ESCAPES, ord("\n"): "\\x0a", ord("\t"): "\\x09"}


def to_text(block: Block) -> str:
    """Decode a block, showing bytes that are not UTF-8 as \\xNN escapes."""
    return bytes(block).decode("utf-8", "backslashreplace")


def escape_controls(text: str) -> str:
    """Show the characters that steer a terminal (ESC, BEL, C1 codes,
    bidirectional overrides) as visible escapes, so text is safe to print."""
    return text.translate(_TERMINAL_ESCAPES)


def escape_line(text: str) -> str:
    """Return text safe within a one-line message (a file name): what
    escape_controls() shows, and line breaks and tabs too."""
    return text.translate(_LINE_ESCAPES)


def escape_block(block: Block) -> bytes:
    """Return a block of events safe to print: bytes that are not UTF-8 as
    \\xNN, and escape_controls'."""
    return escape_controls(to_text(block)).encode("utf-8")


def ip_of(host: str) -> IPAddress:
    """Return the IP address a numeric host names (an IPv6 scope, %eth0,
    dropped); ValueError for a name."""
    return ipaddress.ip_address(host.split("%", 1)[0])


class UnixAddress(tuple):
    """A UNIX stream socket's address, ("unix:PATH", None): the pair that
    format_address(*address) names, as (host, port) is for TCP; .path is
    the socket file."""

    def __new__(cls, path: str) -> "UnixAddress":
        return tuple.__new__(cls, (UNIX_PREFIX + path, None))

    @property
    def path(self) -> str:
        return self[0][len(UNIX_PREFIX):]


def parse_unix(text: str) -> UnixAddress:
    """Parse "unix:/PATH" (socat's and syslog-ng's name for a UNIX stream
    socket) into a UnixAddress."""
    path = text[len(UNIX_PREFIX):]
    if not hasattr(socket, "AF_UNIX"):
        raise ValueError("UNIX sockets (unix:/PATH) exist only on Linux "
                         "and macOS here")
    if not path:
        raise ValueError("expected unix:/PATH, the socket file")
    if "\0" in path:
        raise ValueError("a socket path has no NUL character")
    return UnixAddress(path)


def parse_address(text: str, default_host: str = LISTEN_ADDR) -> tuple:
    """Split "host:port", "[v6]:port" or a bare "port" into (host, port);
    "unix:/PATH" into a UnixAddress."""
    text = text.strip()
    if text[:len(UNIX_PREFIX)].lower() == UNIX_PREFIX:
        return parse_unix(text)
    if text.startswith(PIPE_PREFIXES):
        # CyberTrace's other ConnectionString form: (name, None).
        if os.name != "nt":
            raise ValueError("named pipes (\\\\.\\pipe\\NAME) exist only "
                             "on Windows")
        return parse_pipe(text)
    if text.isascii() and text.isdigit():
        host, port = default_host, text
    elif text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep or not host:
            raise ValueError("expected [IPv6]:PORT")
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            raise ValueError("expected ADDR:PORT")
        if ":" in host:
            raise ValueError("put an IPv6 address in brackets: [ADDR]:PORT")
        host = host or default_host
    # isdigit() alone takes "²", which int() does not.
    if not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise ValueError("port must be a number from 0 to 65535")
    if any(char.isspace() or not char.isprintable() for char in host):
        raise ValueError("a host name has no spaces or control characters")
    try:
        host.encode("idna")  # as the resolver will, with an exception
    except UnicodeError:
        raise ValueError("a part of the host name is empty or over 63 "
                         "characters") from None
    return host, int(port)


def format_address(host: str, port: Optional[int]) -> str:
    """Return host and port as a ConnectionString, IPv6 in brackets (a
    UnixAddress's or a named pipe's port is None: its host is all of it)."""
    if port is None:
        return host
    return "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)


def format_peer(address: tuple) -> str:
    """Return a socket address (from accept or getpeername) as a
    ConnectionString: 127.0.0.1:41882, [::1]:41882."""
    return format_address(peer_host(address[0]), address[1])


def open_connection(address: tuple,
                    timeout: Optional[float] = None) -> socket.socket:
    """Connect to (host, port) over TCP, to a UnixAddress or to a named
    pipe; raise OSError as socket.create_connection does."""
    if is_pipe(address):
        return connect_pipe(address[0], timeout)
    if not isinstance(address, UnixAddress):
        return socket.create_connection(address, timeout=timeout)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(address.path)
    except BaseException:
        sock.close()
        raise
    return sock


Listen = collections.namedtuple("Listen", "label address")
Listen.__doc__ = """One -l: its label ("" for none) and its address."""
_LABEL = re.compile(r"([A-Za-z0-9_.-]*)=")


def parse_listen(text: str) -> Listen:
    """Parse -l's [LABEL=]ADDRESS into a Listen."""
    # A label is a plain word before "=": a path (unix:/a=b), a pipe
    # (\\.\pipe\a=b) or an address holds ":", "/" or "\\" before any
    # "=", so none of them reads as a label.
    found = _LABEL.match(text.strip())
    label = ""
    if found:
        label = found.group(1)
        if not label:
            raise ValueError("empty label before '=': give LABEL=ADDRESS")
        text = text.strip()[found.end():]
    return Listen(label, parse_address(text))


def peer_host(host: str) -> str:
    """Return a peer's host as people know it."""
    # An IPv4 peer of a dual-stack [::] socket comes as ::ffff:a.b.c.d;
    # people know it, and CyberTrace's settings name it, as a.b.c.d.
    if host.lower().startswith("::ffff:") and "." in host:
        return host[7:]
    return host


def format_count(number: int) -> str:
    """Return number with thousands separators: 1,204."""
    return "{:,}".format(number)


def plural(number: int, word: str, words: Optional[str] = None) -> str:
    """Return "1 event" or "1,204 events" (words: an irregular plural)."""
    if number == 1:
        return "1 " + word
    return "%s %s" % (format_count(number), words or word + "s")


def format_bytes(number: int) -> str:
    """Return a size as people read it: 245 bytes, 530.2 KiB, 1.5 GiB."""
    if number < 1024:
        return plural(number, "byte")
    size = float(number)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        size /= 1024
        if size < 1024 or unit == "TiB":
            break
    # 1023.96 KiB would round up to "1024.0 KiB": say 1.0 MiB instead.
    if round(size, 1) >= 1024 and unit != "TiB":
        size /= 1024
        unit = {"KiB": "MiB", "MiB": "GiB", "GiB": "TiB"}[unit]
    return "%s %s" % ("{:,.1f}".format(size), unit)


def format_duration(seconds: float) -> str:
    """Return a duration as H:MM:SS, or as seconds below a minute."""
    if seconds < 60:
        return "%.1f s" % seconds if seconds < 10 else "%d s" % seconds
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return "%d:%02d:%02d" % (hours, minutes, secs)


def format_latency(seconds: Optional[float]) -> str:
    """Return 1.2 ms below a second, 3.4 s above, - for none."""
    if seconds is None:
        return "-"
    if seconds < 1:
        return "%.1f ms" % (seconds * 1000)
    return "%.1f s" % seconds


def format_progress(events: int, size: int, rate: float) -> str:
    """Return the head of a live line: events, bytes and events a second."""
    return "%s  %s  %s/s" % (plural(events, "event"), format_bytes(size),
                             format_count(int(round(rate))))


def argument_type(convert: Callable, name: str) -> Callable:
    """Make convert an argparse type whose ValueError reads as plain words:
    "argument -n/--count: abc: not a whole number"."""
    def parse(text):
        try:
            return convert(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(
                "%s: %s" % (escape_line(text), exc)) from None
    parse.__name__ = name
    return parse


def parse_number(kind: type, text: str) -> float:
    """Convert text to an int or a finite float, in words when it fails."""
    # Python's own words ("invalid literal for int() with base 10") are
    # meant for programmers; and it takes digits of every script, and
    # "1_0", which no one types on purpose.
    if not text.isascii() or "_" in text:
        raise ValueError("not a whole number" if kind is int
                         else "not a number")
    try:
        value = kind(text)
    except ValueError:
        raise ValueError("not a whole number" if kind is int
                         else "not a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError("not a finite number")
    return value


def bounded(kind: type, low: float, high: float) -> Callable:
    """Return a converter to kind (int or float) that takes low to high:
    a number beyond any sane use is a slip, and would overflow a timer or
    an allocation further on."""
    def convert(text):
        value = parse_number(kind, text)
        if not low <= value <= high:
            raise ValueError("must be from %s to %s" % (
                format_number(low), format_number(high)))
        return value
    return convert


def format_number(number: float) -> str:
    """Return a bound as people write it: 0.01, 1, 10,000,000."""
    return format_count(int(number)) if number == int(number) \
        else "%g" % number


class OneLineParser(argparse.ArgumentParser):
    """argparse whose bad-argument error is one line, as every other error.

    The usage block argparse prints first would push the line that says
    what is wrong off a small console; --help has it.
    """

    def error(self, message: str):
        self.exit(2, "%s: error: %s\n" % (self.prog, message))


class LiveLine:
    """One status line on a terminal that rewrites itself in place, as pv's
    does; any other line first clears it, so it never mixes with them.

    write(text) puts text on the terminal; a subclass may write elsewhere.
    Safe to use from several threads.
    """

    # Columns blanked beyond the line when it is cleared: a terminal echoes
    # ^C after it, and that must go too where Ctrl+C ends the program.
    margin = 0
    # A program that must never wait on stderr (the listener: its loop
    # serves signals) drops a line that a full pipe cannot take now.
    never_block = False

    # Lines held while gate() says a write would land inside a half-written
    # event (stdout is this very terminal), at most so many.
    held_lines = 100

    def __init__(self, live: bool = False) -> None:
        self.live = live
        self.shown = ""  # the line now on the screen
        self.width = 80
        self.lock = threading.RLock()
        self.stderr_flags = False  # once known (see stream_flags)
        self.gate = None  # gate() tells to hold lines for now
        self.held = []
        self.unsent = b""  # the rest of a line stderr took part of
        self.dropped = 0  # lines past held_lines

    @staticmethod
    def on_stderr() -> bool:
        """Tell whether stderr is a terminal a person watches."""
        try:
            return sys.stderr is not None and os.isatty(sys.stderr.fileno())
        except (OSError, ValueError, AttributeError):
            return False

    def write(self, text: str) -> None:
        # With stderr closed (2>&-), print(file=None) would go to stdout.
        if sys.stderr is None:
            return
        if self.holding():
            if len(self.held) < self.held_lines:
                self.held.append(text)
            else:
                self.dropped += text.count("\n")
            return
        self.put(text)

    def put(self, text: str) -> None:
        """Write text to stderr now (the part a full pipe or terminal does
        not take is dropped, or, shared with events, sent before them)."""
        try:
            sys.stderr.flush()
            if self.stderr_flags is False:
                try:
                    self.stderr_flags = stream_flags(sys.stderr.fileno()) \
                        if self.never_block else None
                except (OSError, ValueError, AttributeError):
                    self.stderr_flags = None  # not a file (a StringIO)
            if self.stderr_flags is None:
                sys.stderr.write(text)
                sys.stderr.flush()
            else:
                data = text.encode(sys.stderr.encoding or "utf-8",
                                   "backslashreplace")
                try:
                    sent = write_now(sys.stderr.fileno(), data,
                                     self.stderr_flags)
                except BlockingIOError:
                    sent = 0
                if self.gate is not None:
                    self.unsent = data[sent:]
        except (OSError, ValueError, AttributeError):
            pass

    def holding(self) -> bool:
        """Tell whether lines must wait: they share stdout's terminal or
        pipe, and an event, or a line stderr took part of, is unfinished."""
        return self.gate is not None and (not self.send_unsent() or
                                          self.gate())

    def send_unsent(self) -> bool:
        """Write the rest of a line stderr took part of, before anything
        else goes where it goes; tell whether none is left."""
        if self.unsent:
            try:
                sent = write_now(sys.stderr.fileno(), self.unsent,
                                 self.stderr_flags)
            except BlockingIOError:
                return False
            except (OSError, ValueError, AttributeError):
                sent = len(self.unsent)  # gone: nothing to wait for
            self.unsent = self.unsent[sent:]
        return not self.unsent

    def show(self, text: str) -> None:
        """Rewrite the live line with text, cut to the terminal's width."""
        if not self.live:
            return
        try:
            self.width = os.get_terminal_size(sys.stderr.fileno()).columns
        except (OSError, ValueError, AttributeError):
            pass
        # A line that wraps could no longer be rewritten with \r.
        text = text[:self.width - 1 if self.width > 1 else 79]
        with self.lock:
            if self.holding():
                return  # redrawn once the event is whole
            if text != self.shown:
                # Spaces, not an ANSI erase: every console understands them.
                gone = len(self.shown) - len(text)
                self.shown = text
                self.write("\r" + text + " " * gone + "\b" * max(gone, 0))

    def clear(self) -> None:
        with self.lock:
            if self.shown:
                blank = min(len(self.shown) + self.margin, self.width - 1)
                self.shown = ""
                self.write("\r" + " " * blank + "\r")

    def line(self, message: str) -> None:
        """Print a line on a line of its own, above the live line."""
        with self.lock:
            self.clear()
            self.write(message + "\n")

    def release(self, end_line: bool = False) -> None:
        """Write the lines held while an event was half-written, once it is
        whole (or, with end_line, at once, on a line of their own)."""
        with self.lock:
            if not end_line and (not (self.held or self.dropped) or
                                 self.holding()):
                return
            held, self.held = self.held, []
            if end_line:
                held.insert(0, self.unsent.decode("utf-8", "replace") +
                            "\n")
                self.unsent = b""
            if self.dropped:
                held.append("%s not shown while an event was half-written\n"
                            % plural(self.dropped, "more status line"))
                self.dropped = 0
            self.put("".join(held))


class Console(LiveLine):
    """Write status lines to stderr, and on a terminal one live line.

    Events written to the same terminal clear the live line first too;
    stdout never sees it.
    """

    def __init__(self, quiet: bool = False, live: bool = False) -> None:
        super().__init__(live)
        self.quiet = quiet

    @classmethod
    def for_stderr(cls, quiet: bool) -> "Console":
        """Show a live line only where a person watches stderr."""
        return cls(quiet, not quiet and cls.on_stderr())

    def status(self, message: str) -> None:
        """Print a status line, unless quiet."""
        if not self.quiet:
            self.line(message)

    def warn(self, message: str) -> None:
        """Print a warning, even when quiet."""
        self.line("warning: " + message)


class RateMeter:
    """Events per second over the last few samples (about a second)."""

    def __init__(self, now: float, samples: int = 5) -> None:
        self.samples = [(now, 0)]
        self.keep = samples

    def rate(self, now: float, count: int) -> float:
        """Add a sample; return the rate since the oldest one kept."""
        self.samples.append((now, count))
        del self.samples[:-self.keep]
        then, before = self.samples[0]
        return (count - before) / (now - then) if now > then else 0.0


def parse_prefixes(text: str) -> tuple:
    """Parse --per-host-prefix "V4/V6" (or one number for IPv4 alone)."""
    v4, sep, v6 = text.partition("/")
    v6 = v6 if sep else str(PER_HOST_PREFIX[1])
    if not all(part.isascii() and part.isdigit() for part in (v4, v6)) \
            or not (1 <= int(v4) <= 32 and 1 <= int(v6) <= 128):
        raise ValueError("expected V4/V6 prefix lengths, such as 32/64 or "
                         "24/48 (IPv4 1 to 32, IPv6 1 to 128)")
    return int(v4), int(v6)


def host_key(host: str, prefixes: tuple = PER_HOST_PREFIX) -> str:
    """Return the network that counts as a peer's host for --max-per-host."""
    try:
        ip = ip_of(host)
    except ValueError:
        return host
    if ip.version == 6 and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    length = prefixes[0] if ip.version == 4 else prefixes[1]
    if length == ip.max_prefixlen:
        return str(ip)
    return str(ipaddress.ip_network("%s/%d" % (ip, length), strict=False))


def parse_network(text: str) -> IPNetwork:
    """Convert text to an IP network, in words when it fails."""
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError("not a network (such as 192.0.2.0/24, 10.0.0.5 or "
                         "2001:db8::/32)") from None


def interface_addresses() -> list:
    """Return this host's interface addresses (Linux); [] elsewhere."""
    found = []
    if not sys.platform.startswith("linux"):
        return found
    try:
        import fcntl
        import struct
        siocgifaddr = 0x8915
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            for _, name in socket.if_nameindex():
                try:
                    answer = fcntl.ioctl(probe.fileno(), siocgifaddr,
                                         struct.pack("256s",
                                                     name.encode()[:15]))
                except OSError:
                    continue  # no IPv4 address on this interface
                found.append(ipaddress.ip_address(answer[20:24]))
    except (ImportError, OSError):
        pass
    try:
        with open("/proc/net/if_inet6") as table:
            for row in table:
                found.append(ipaddress.ip_address(bytes.fromhex(
                    row.split()[0])))
    except (OSError, ValueError, IndexError):
        pass
    return found


def resolved_addresses() -> list:
    """Return the addresses this host's name resolves to."""
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None,
                                   type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return []
    found = []
    for info in infos:
        try:
            found.append(ip_of(info[4][0]))
        except ValueError:
            pass
    return found


def keep_freed_memory() -> None:
    """Ask glibc to reuse freed memory rather than return it to the kernel."""
    # Every batch allocates and frees a few hundred KiB.  By default glibc
    # gives such blocks back to the kernel at once, and taking them again
    # costs a page fault per 4 KiB: a fifth of the time of a text batch.
    # Memory stays bounded: the batches are.
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return  # not glibc (musl): nothing to tune
        import ctypes
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, ValueError, OSError, ImportError):
        # No os.confstr (Windows), no such name (macOS), or no ctypes.
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_trim_threshold, 16 << 20)
    mallopt(m_mmap_threshold, 16 << 20)


def peer_gone(sock: socket.socket) -> str:
    """Return why the peer of a connection we only write to is gone, if it
    closed or reset, else ""."""
    # As rsyslog's omfwd does before a send: a peer that closed while we
    # waited must not get events that only its kernel would take.
    try:
        if not select.select([sock], [], [], 0)[0] or \
                sock.recv(1, socket.MSG_PEEK):
            return ""
    except (BlockingIOError, InterruptedError, socket.timeout):
        return ""
    except OSError as exc:
        return exc.strerror or str(exc)
    return "closed by the peer"


def silence_stdout() -> None:
    """Point stdout at the null device once its reader went away (| head),
    so that nothing more is written there, at exit neither."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)


def write_stdout(data: bytes) -> None:
    """Write data to stdout now; UserError if it cannot take it.

    A reader that went away (| head, a consumer that died) is an error, as
    for the listener's events: a service manager must see it fail.
    """
    try:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    except BrokenPipeError:
        silence_stdout()
        raise UserError("cannot write to stdout: Broken pipe") from None
    except (OSError, AttributeError, ValueError) as exc:
        raise UserError("cannot write to stdout: %s" % (
            getattr(exc, "strerror", None) or exc)) from None


class Silence(Console):
    """A console that prints nothing: an embedder says what matters."""

    def write(self, text: str) -> None:
        pass


class EmbeddedListener:
    """A quiet listener inside another program (the sender's --check).

    Same framing and connection handling as the command line's; each block
    of whole events (bytes, one b"\\n" each) goes to take(block, peer)
    instead of stdout; allow, as --allow, lets only those networks in.
    serve() runs it (in a thread of the owner's), stop() ends serve() from
    any thread, close() frees its sockets.
    """

    def __init__(self, address: tuple, take: Callable[[bytes, str], None],
                 allow: Optional[list] = None) -> None:
        settings = Settings(listen=address, format="raw", quiet=True,
                            allow=allow)
        self.listener = OwnedListener(settings, Handover(take), Silence())
        # The loop already wakes for signal numbers on a socket: stop() uses
        # the same way in, so serve() needs no second one.
        self.waker = socket.socketpair()
        for sock in self.waker:
            sock.setblocking(False)
        self.listener.watch_signals(self.waker[0])

    def bind(self) -> str:
        """Listen; return the address, as a ConnectionString."""
        self.listener.bind()
        return format_address(*self.listener.address())

    def serve(self) -> None:
        self.listener.serve()

    @property
    def accepted(self) -> int:
        """How many connections it took."""
        return self.listener.admission.accepted

    @property
    def rejected(self) -> int:
        """How many connections it refused (--allow)."""
        return self.listener.admission.rejected

    @property
    def first_rejected(self) -> str:
        """The peer of the first connection it refused, or ""."""
        return self.listener.admission.first_rejected

    def stop(self) -> None:
        """Make serve() write out what arrived and return, from any thread."""
        try:
            self.waker[1].send(bytes([signal.SIGTERM]))
        except OSError:
            pass  # a full socket already holds a wake-up

    def close(self) -> None:
        self.listener.close()
        for sock in self.waker:
            sock.close()


# --- Formats -----------------------------------------------------------------
#
# Each takes a block of whole events and returns the bytes to write:
# format(block, lines, peer, when, escape, listen), lines being the block's
# events with their b"\n", escape whether control characters must be shown
# as escapes (the output is a terminal, or --escape), listen where they
# arrived (the label of its -l, or the address).

def format_raw(block: Block, lines: list, peer: str, when: float,
               escape: bool, listen: str = "") -> Block:
    """Format each event on one line as received, or escaped."""
    return escape_block(block) if escape else block


def format_text(block: Block, lines: list, peer: str, when: float,
                escape: bool, listen: str = "") -> bytes:
    """Format each event as the tutorial does: "Received:", then it."""
    if escape:
        lines = split_lines(escape_block(block))
    out = b"Received:\n".join([b""] + lines)
    if escape or valid_utf8(out):
        return out
    return format_text(block, split_lines(to_text(block).encode("utf-8")),
                       peer, when, escape)


def parse_event_prefix(text: str) -> tuple:
    """Convert --prefix's comma-separated fields (time,peer,listen) to a
    tuple in the order given, in words when it fails."""
    fields = tuple(text.split(","))
    for field in fields:
        if field not in PREFIX_FIELDS:
            raise ValueError("%s: choose one or more of %s, comma-separated"
                             % ("empty field" if not field else
                                "unknown field %r" % escape_line(field),
                                ",".join(PREFIX_FIELDS)))
        if fields.count(field) > 1:
            raise ValueError("%s given twice" % field)
    return fields


# In a --prefix field: white space, controls and "%" itself as %XX.
_PREFIX_UNSAFE = re.compile(r"[\s%\x00-\x1f\x7f]")


def _percent(found: re.Match) -> str:
    return "".join("%%%02X" % byte for byte in found.group().encode())


class EventPrefix:
    """Put --prefix's fields before each event of a block, each followed by
    one space: "2026-12-07T23:01:02.123Z 10.0.0.5:51234 0.0.0.0:9998 "."""

    def __init__(self, fields: tuple) -> None:
        self.fields = fields

    def head(self, peer: str, listen: str, when: float) -> bytes:
        """Return the prefix of events from peer by listen at when."""
        values = {"time": iso_time(when), "peer": peer, "listen": listen}
        # A UNIX peer ("unix:/run/ct.sock (pid 812)"), a pipe's client or a
        # path may hold a space: each field stays one word for cut and awk.
        return "".join(_PREFIX_UNSAFE.sub(_percent, values[field]) + " "
                       for field in self.fields).encode(
            "utf-8", "surrogateescape")

    def apply(self, block: Block, peer: str, listen: str,
              when: float) -> bytes:
        """Return block (whole events) with the prefix before each event."""
        lines = split_lines(block)
        # One join of the prefix and the events in turn: several times
        # quicker than bytes.replace or a separator's join, twice as quick
        # as a + per event.
        parts = [self.head(peer, listen, when)] * (2 * len(lines))
        parts[1::2] = lines
        return b"".join(parts)


def valid_utf8(data: bytes) -> bool:
    """Tell whether data is valid UTF-8 (ASCII is, and is quick to tell)."""
    if data.isascii():
        return True
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


_encode_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"),
                                check_circular=False).encode
# JSON escapes C0 controls itself; these others steer a terminal too.
_JSON_TERMINAL_ESCAPES = {code: "\\u%04x" % code
                          for code in [*range(0x7F, 0xA0), 0x2028, 0x2029,
                                       *range(0x202A, 0x202F),
                                       *range(0x2066, 0x206A)]}
_FIELD_SPLIT_BYTES = re.compile(rb"(?:^|[ |])([^\s|=]+)=")
# An event's shape: its keys in order, with what comes before each.
_SHAPE = re.compile(rb"(?:^|[ |])[^\s|=]+=")
_CONTROLS = bytes(range(0x20)).replace(b"\n", b"")


def iso_time(when: float) -> str:
    """Return when as ISO 8601 UTC with milliseconds."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when)) + \
        ".%03dZ" % (int(when * 1000) % 1000)


def has_controls(data: bytes) -> bool:
    """Tell whether data holds a control character other than b"\\n"."""
    return len(data.translate(None, _CONTROLS)) != len(data)


def json_text(event: str, stamp: str, peer: str, listen: str = "") -> str:
    """Format one event the general way, for what no plan fits."""
    kind, fields = read_event(event)
    return _encode_json({"time": stamp, "peer": peer, "listen": listen,
                         "kind": kind, "event": event, "fields": fields}
                        ) + "\n"


def json_piece(event: str, stamp: str, peer: str, kind: str, fields: dict,
               piece: int, last: bool, listen: str = "") -> str:
    """Format one piece of an event cut into several."""
    return _encode_json({"time": stamp, "peer": peer, "listen": listen,
                         "kind": kind, "event": event, "fields": fields,
                         "piece": piece, "last": last}) + "\n"


def json_member(text: str) -> bytes:
    """Return text as the inside of a JSON string, for a plan's template
    ("%" doubled: the template is formatted once more)."""
    return json_bytes(_encode_json(text)[1:-1]).replace(b"%", b"%%")


def json_bytes(text: str) -> bytes:
    """Encode JSON text whose strings may hold bytes that were not UTF-8.

    Such a byte was decoded with surrogateescape as U+DC80 to U+DCFF, which
    no text holds, and is written as the JSON escape \\udcNN: a reader can
    tell it from a literal "\\xff" in the event, and Python gets the
    bytes back with .encode("utf-8", "surrogateescape").
    """
    return text.encode("utf-8", "backslashreplace")


class JsonPlan:
    """The shape of one event template, compiled to check and format fast.

    CyberTrace writes every event from a few templates.  A plan matches an
    event of its template with one regular expression that checks the whole
    shape (the same keys, no "=" inside a value, nothing to escape), then
    formats it with one %; anything else takes the general path.
    """

    # A value on the fast path holds no "=".  (Nor "\\n", which ends the
    # line, but a set of two would make sre test each byte twice as slowly.)
    # What JSON escapes is dealt with before, once per batch.
    VALUE = rb"([^=]*)"

    def __init__(self, event: bytes) -> None:
        keys = list(_FIELD_SPLIT_BYTES.finditer(event))
        # A value that ends with white space, which parse_fields trims, is
        # left to the general path: a look back after each later key (and
        # at the end) refuses it; the prefix is no field.  After the key,
        # not before: sre still finds the key by its first byte, and looks
        # back once per field.
        pattern = [re.escape(m.group(0)) + (b"(?<!\\s%s)" % re.escape(
            m.group(0)) if index else b"") + self.VALUE
            for index, m in enumerate(keys)]
        end = b"(?<!\\s)\n" if keys else b"\n"
        if not keys or keys[0].start():
            pattern.insert(0, self.VALUE)  # the prefix: a group, not a field
        # Group 1 is the whole event; a value's group number follows.
        self.match = re.compile(b"(" + b"".join(pattern) + b")" + end
                                ).fullmatch
        first = 2 + len(pattern) - len(keys)
        groups = {}
        for number, m in enumerate(keys, first):
            groups.setdefault(m.group(1), []).append(number)
        fields, picks = [], [1]
        for key, where in groups.items():
            values = b",".join([b'"%%s"'] * len(where))
            fields.append(b'"%s":%s' % (key.replace(b"%", b"%%%%"), values
                                        if len(where) == 1 else
                                        b"[" + values + b"]"))
            picks.extend(where)
        # Formatted twice: once a batch with its time and peer, then once
        # an event, with the groups that match() found, in the key order.
        # Its events hold no CEF header, <PRI>, alert key or LookupFinished
        # (format() sees to the last), so their kind is their keys', the
        # same for all.
        kind = read_event(event.decode("utf-8", "replace"))[0].encode()
        event_slot = b"%%s"
        if picks[1:] == list(range(first, first + len(keys))):
            # No key repeats: the values come in the groups' own order, and
            # groups() gives them 40% quicker than group(*picks) (the
            # prefix's group, if any, is formatted away as "%.0s").
            event_slot += b"%%.0s" * (first - 2)
            self.values = operator.methodcaller("groups")
        else:
            self.values = operator.methodcaller("group", *picks)
        self.template = (b'{"time":"%s","peer":"%s","listen":"%s",'
                         b'"kind":"' + kind + b'","event":"' + event_slot +
                         b'","fields":{' + b",".join(fields) + b"}}\n")
        self.batch = None
        self.format = b""
        self.shape = b""  # set by the JsonFormatter that keeps it
        self.count = 0

    @classmethod
    def build(cls, line: bytes, shape: Optional[bytes] = None):
        """Return a plan for line's template (its shape, if known), or
        None if none can serve."""
        event = line[:-1]
        if shape is None:
            shape = b"".join(_SHAPE.findall(event))
        if event[:1] == b"<" or b"CEF:" in event or _ALERT_KEY.search(shape):
            return None  # read_event tells more than the keys
        parts = _FIELD_SPLIT_BYTES.split(event)
        if any(b"=" in text for text in parts[::2]):  # prefix and values
            return None
        if any(value[-1:].isspace() for value in parts[2::2]):
            return None  # the plan would refuse its own template
        return cls(event)


class JsonFormatter:
    """Write one JSON object per event: time, peer, event and fields.

    Events of a known template go through its compiled plan (JsonPlan),
    the rest through json.  A plan is looked for first among the few last
    found for events with as many "=" (quick to count), then by the
    event's shape, its keys in order; at most max_plans are kept, the
    least recently used going first, and new ones are compiled at a
    bounded rate for each peer, and for a bounded time a batch.  So a
    peer sending ever-new shapes costs its own events their general path,
    and nothing to anyone else's known templates, nor their plans.
    """

    # Sites use a few dozen templates at most, of a few dozen fields and
    # well under a KiB: a plan's regular expression grows with its fields
    # and keys, and so does the time to compile it (a template of 18
    # fields: 1 ms; 64 fields of 8 bytes: 4 ms; 128 of 100 bytes: 35 ms).
    max_plans = 256
    max_plan_fields = 64
    max_plan_keys_bytes = 1024  # the shape: every key with what precedes it
    max_plan_bytes = 16 * 1024
    plans_per_count = 4
    # Each peer may have this many plans compiled a second, after a first
    # burst; a plan that took longer than build_seconds to compile counts
    # as that many times more.  Per peer: one sending ever-new shapes must
    # not use up what the templates of another need.
    builds_per_second = 16
    build_burst = 32
    build_seconds = 0.001
    # A batch (one read of one peer) stops compiling past this: the others
    # wait for the batch.
    batch_build_seconds = 0.002
    max_buckets = 1024

    def __init__(self, escape_strings: bool = False) -> None:
        # --escape: control characters become visible \\xNN text inside
        # the strings too, so that jq -r cannot print them raw.
        self.escape_strings = escape_strings
        self.by_count = {}  # "=" count: the plans last found, newest first
        self.by_shape = collections.OrderedDict()  # least recent first
        # Each peer's allowance of plans: peer -> (tokens, when counted).
        self.buckets = {}
        self.batch_built = 0.0  # seconds spent compiling in this batch
        # The kind of each peer's event whose pieces are coming, given to
        # every piece: only the first has the text that tells it.
        self.piece_kinds = {}
        # (peer, listen): the two as a template's JSON, made once a peer.
        self.names = {}

    def format(self, block: Block, lines: list, peer: str, when: float,
               escape: bool, marks=NO_MARKS, listen: str = "") -> bytes:
        """Format a block of events received from peer at when, at listen;
        marks: the pieces of split events in it (EventFramer.marks)."""
        stamp = iso_time(when)
        data = bytes(block)
        if escape or not valid_utf8(data):
            return self.format_slowly(data, stamp, peer, escape, marks,
                                      listen)
        if marks:
            return self.format_pieces(data, lines, peer, when, marks, listen)
        # A "%" in the peer (an IPv6 scope, fe80::1%eth0) must survive the
        # second formatting; a pipe's name and a UNIX socket's path may
        # hold what JSON escapes.
        names = self.names.get((peer, listen))
        if names is None:
            if len(self.names) >= 1024:
                self.names.clear()
            names = self.names[peer, listen] = (json_member(peer),
                                                json_member(listen))
        head = (stamp.encode(), *names)
        batch = object()
        self.batch_built = 0.0
        out = []
        by_count = self.by_count
        clean = not has_controls(data) and b'"' not in data and \
            b"\\" not in data
        # What makes a kind other than the plan's keys say, or a CEF
        # header or <PRI> the plan's prefix would take in: such lines go
        # the general way.  Looked for once a batch, as a per-line look
        # ahead in the plan's prefix would slow every event.
        # (A CEF header has a "|" and a <PRI> a "<": one byte, found at
        # memchr's speed, is looked for before the longer needle.  An
        # alert needs an alert key, which no plan has: one scan less.)
        plain = FINISHED not in data and (
            b"|" not in data or b"CEF:" not in data) and (
            b"<" not in data or data[:1] != b"<" and b"\n<" not in data)
        for original in lines:
            line = original
            if not plain and (FINISHED in line or b"CEF:" in line or
                              line[:1] == b"<"):
                out.append(self.general(line[:-1].decode(), stamp,
                                        peer, listen=listen).encode())
                continue
            if not clean:
                if has_controls(line):
                    out.append(self.general(line[:-1].decode(), stamp,
                                            peer, listen=listen).encode())
                    continue
                if b'"' in line or b"\\" in line:
                    line = line.replace(b"\\", b"\\\\").replace(
                        b'"', b'\\"')
            for plan in by_count.get(line.count(b"="), ()):
                found = plan.match(line)
                if found is not None:
                    break
            else:
                plan = self.find(line, peer)
                found = plan and plan.match(line)
                if not found:
                    out.append(json_text(original[:-1].decode(), stamp,
                                         peer, listen).encode())
                    continue
            if plan.batch is not batch:
                plan.batch, plan.format = batch, plan.template % head
                self.used(plan)
            out.append(plan.format % plan.values(found))
        return b"".join(out)

    def format_slowly(self, data: bytes, stamp: str, peer: str,
                      escape: bool, marks=NO_MARKS,
                      listen: str = "") -> bytes:
        """Format every event of data through json: for what is not UTF-8,
        and what is escaped (terminal: what JSON leaves in strings)."""
        events = data.decode("utf-8", "surrogateescape")[:-1].split("\n")
        pieces = {line: (number, last) for line, number, last in marks}
        out = "".join(self.general(event, stamp, peer, pieces.get(index),
                                   listen)
                      for index, event in enumerate(events))
        if escape:
            out = out.translate(_JSON_TERMINAL_ESCAPES)
        return json_bytes(out)

    def format_pieces(self, data: bytes, lines: list, peer: str,
                      when: float, marks, listen: str = "") -> bytes:
        """Format a block that holds pieces of split events: the pieces
        one by one, the whole events between them as usual."""
        stamp = iso_time(when)
        out = []
        start = 0
        for index, number, last in marks:
            if index >= len(lines):
                break  # --count left them out
            if start < index:
                run = lines[start:index]
                out.append(self.format(b"".join(run), run, peer, when,
                                       False, listen=listen))
            out.append(self.general(lines[index][:-1].decode(), stamp, peer,
                                    (number, last), listen).encode())
            start = index + 1
        if start < len(lines):
            run = lines[start:]
            out.append(self.format(b"".join(run), run, peer, when, False,
                                   listen=listen))
        return b"".join(out)

    def general(self, event: str, stamp: str, peer: str,
                piece: Optional[tuple] = None, listen: str = "") -> str:
        """Format one event through json (--escape: its controls as text);
        piece: (its number, whether it is the last) for a piece."""
        if self.escape_strings:
            event = escape_controls(event)
        if piece is None:
            return json_text(event, stamp, peer, listen)
        number, last = piece
        if number == 1:
            # The first piece starts the event: the fields are its own.
            kind, fields = read_event(event)
            if len(self.piece_kinds) >= MAX_CONNECTIONS_LIMIT:
                self.piece_kinds.clear()  # peers that left mid-event
            self.piece_kinds[peer] = kind
        else:
            # The others start anywhere, mid-key or mid-value: no fields.
            fields = {}
            kind = (self.piece_kinds.pop(peer, "unknown") if last else
                    self.piece_kinds.get(peer, "unknown"))
        return json_piece(event, stamp, peer, kind, fields, number, last,
                          listen)

    def used(self, plan: JsonPlan) -> None:
        """Keep a plan in use, and first to be tried for its "=" count."""
        # Once a batch: look-alike plans (the same keys but the last) fail
        # late, and must not stand before a template's own for good.
        self.by_shape.move_to_end(plan.shape)
        bucket = self.by_count[plan.count]
        if bucket[0] is not plan:
            bucket.remove(plan)
            bucket.insert(0, plan)

    def find(self, line: bytes, peer: str = "") -> Optional[JsonPlan]:
        """Return the plan for line's shape, compiling one if peer may."""
        if len(line) > self.max_plan_bytes:
            return None  # no template is that long: not worth a plan
        shape = b"".join(_SHAPE.findall(line))
        plan = self.by_shape.get(shape)
        if plan is None:
            plan = self.build(line, shape, peer)
            if plan is None:
                return None
        bucket = self.by_count.setdefault(plan.count, [])
        if plan not in bucket:
            bucket.insert(0, plan)
            del bucket[self.plans_per_count:]
        return plan

    def build(self, line: bytes, shape: bytes,
              peer: str = "") -> Optional[JsonPlan]:
        """Compile and keep a plan for line, within peer's rate, the
        batch's time and the caps."""
        if shape.count(b"=") > self.max_plan_fields or \
                len(shape) > self.max_plan_keys_bytes or \
                self.batch_built >= self.batch_build_seconds:
            return None
        tokens = self.tokens(peer)
        if tokens < 1:
            return None
        started = time.perf_counter()
        plan = JsonPlan.build(line, shape)
        took = time.perf_counter() - started
        self.batch_built += took
        if plan is None:
            return None
        self.buckets[peer] = (tokens - max(1.0, took / self.build_seconds),
                              time.monotonic())
        plan.shape, plan.count = shape, line.count(b"=")
        self.by_shape[shape] = plan
        if len(self.by_shape) > self.max_plans:
            _, old = self.by_shape.popitem(last=False)
            bucket = self.by_count.get(old.count, [])
            if old in bucket:
                bucket.remove(old)
                if not bucket:
                    del self.by_count[old.count]
        return plan

    def tokens(self, peer: str) -> float:
        """Return how many plans peer may have compiled now."""
        now = time.monotonic()
        if len(self.buckets) > self.max_buckets:
            # Peers long gone, or quiet long enough, have a full bucket,
            # as a newcomer has: nothing to keep.
            self.buckets = {key: (tokens, when) for key, (tokens, when) in
                            self.buckets.items() if tokens + (now - when) *
                            self.builds_per_second < self.build_burst}
            if len(self.buckets) > self.max_buckets // 2:
                self.buckets = {}  # thousands of peers compiling: start over
        tokens, when = self.buckets.get(peer, (self.build_burst, now))
        return min(self.build_burst,
                   tokens + (now - when) * self.builds_per_second)

    def plans(self) -> int:
        """Return how many plans are kept."""
        return len(self.by_shape)


def formatter(name: str, escape: bool = False) -> Callable:
    """Return the format function for a --format name (--escape: JSON
    strings escape control characters too)."""
    if name == "json":
        return JsonFormatter(escape).format
    return {"raw": format_raw, "text": format_text}[name]


# --- Output ------------------------------------------------------------------

class OutputFailed(UserError):
    """Events could not be written; the listener stops and says how many.
    hung_up: the output was a terminal that went away (EIO)."""

    hung_up = False


class Output:
    """Write formatted events to stdout or to a file that SIGHUP reopens.

    Events go out whole: a write that fails halfway into a file is cut
    back to the last whole event; a pipe gets only whole events, each
    once the pipe has room for all of it, so that a reader that stops for
    good finds no event cut short; and a pipe, socket or terminal whose
    reader stalls is never waited on (the loop must still see signals):
    what it cannot take now stays pending until flush() finds room.
    """

    # A reopen that failed (SIGHUP) is tried again on a write, this often.
    reopen_every = 1.0

    def __init__(self, path: Optional[str], lines_per_event: int = 1,
                 file_mode: int = FILE_MODE) -> None:
        self.path = path
        self.name = escape_line(path) if path else "stdout"
        self.file_mode = file_mode
        # Lines each event takes (text: "Received:" and the event), to cut
        # and count whole events.
        self.lines_per_event = lines_per_event
        try:
            # fd 1 itself: sys.stdout is None when the shell closed it.
            self.fd = self._open() if path else binary_stdout()
        except OSError as exc:
            raise UserError("cannot open %s: %s" % (self.name, exc.strerror))
        self.terminal = os.isatty(self.fd)
        self.pending = bytearray()
        # Where the bytes written so far stop: lines into an event, and
        # whether in the middle of a line (a short write to a terminal).
        self.lines_in = 0
        self.mid_line = False
        self.reopen_failed = None  # why the last reopen failed, if it did
        self.next_reopen = 0.0
        self.warn = None  # warn(message), from whoever shows warnings
        # Shared with stderr: before_write() tells whether the status line
        # last written is whole, so that events may follow it.
        self.before_write = None
        self.opened()
        # A Windows console shows UTF-8 only through sys.stdout, which
        # writes wide characters; os.write would use its code page.
        self.console = None
        if os.name == "nt" and self.terminal and not path:
            self.console = getattr(sys.stdout, "buffer", None)

    def _open(self) -> int:
        # O_BINARY: on Windows, a file opened without it gets "\r\n".
        # O_NONBLOCK: a FIFO nobody reads fails at once (ENXIO) instead of
        # holding the listener in open(); set back to blocking at once.
        flags = os.O_WRONLY | os.O_APPEND | getattr(os, "O_BINARY", 0) | \
            getattr(os, "O_NONBLOCK", 0)
        try:
            fd = os.open(self.path, flags | os.O_CREAT | os.O_EXCL,
                         self.file_mode)
        except FileExistsError:
            # As it is (a FIFO, or the file logrotate's "create" made).
            fd = os.open(self.path, flags | os.O_CREAT, self.file_mode)
        else:
            # The mode asked for, not what the umask leaves of it: detections
            # are for their readers only, and 0660 must mean 0660.
            if hasattr(os, "fchmod"):
                os.fchmod(fd, self.file_mode)
        if getattr(os, "O_NONBLOCK", 0):  # Windows has none to clear
            os.set_blocking(fd, True)
        return fd

    def opened(self) -> None:
        """Learn what the new fd is: whether it stalls, whether a pipe."""
        self.flags = stream_flags(self.fd)
        widen_pipe(self.fd)
        # A pipe's writes that its reader has not taken whole yet, as
        # (bytes written to it in all at that write's end, what it wrote):
        # the pages they take, and the events lost if the reader goes.
        self.in_pipe = collections.deque() \
            if self.flags is not None and pipe_state(self.fd) else None
        self.sent_bytes = 0
        self.room_wanted = None  # an event waits for this much room
        self.unread_lost = self.events_lost = 0
        self.oversize_warned = False

    def reopen(self) -> Optional[str]:
        """Open the file anew (after logrotate), keeping the old one if it
        fails; return why it failed, or None."""
        self.next_reopen = time.monotonic() + self.reopen_every
        try:
            fd = self._open()
        except OSError as exc:
            self.reopen_failed = exc.strerror or str(exc)
            return self.reopen_failed
        os.close(self.fd)
        self.fd = fd
        self.opened()
        self.reopen_failed = None
        return None

    def reopen_due(self) -> bool:
        """Tell whether a failed reopen should be tried again now."""
        return self.reopen_failed is not None and \
            time.monotonic() >= self.next_reopen

    def stalled(self) -> bool:
        """Tell whether events wait for a pipe's reader to take them."""
        return bool(self.pending)

    def mid_event(self) -> bool:
        """Tell whether the bytes written so far end inside an event."""
        return self.mid_line or bool(self.lines_in)

    def watched_pipe(self) -> Optional[int]:
        """Return the fd of a pipe whose reader going away select() tells
        (Linux: POLLERR on its write end, as coreutils' tail watches), or
        None."""
        if self.in_pipe is None or not sys.platform.startswith("linux"):
            return None
        # Opened for reading too (1<>FIFO), it would be readable whenever
        # it holds events: only a write end is quiet until the reader goes.
        if self.flags & getattr(os, "O_ACCMODE", 3) != os.O_WRONLY:
            return None
        return self.fd

    def check_reader(self) -> None:
        """Fail as a write would if the pipe's reader went away."""
        if pipe_reader_gone(self.fd):
            self.count_lost()
            raise OutputFailed("cannot write to %s: %s" % (
                self.name, os.strerror(errno.EPIPE)))

    def write(self, data: Block, peer: str = "") -> None:
        """Write events (from peer); what a stalled pipe cannot take waits."""
        if self.pending:
            self.pending += data
            return
        written = self._write(data)
        if written < len(data):
            self.pending = bytearray(memoryview(data)[written:])

    def flush(self) -> None:
        """Write what waits, as much as the pipe takes now (select() said
        it takes some, or room_wanted is polled for)."""
        if self.pending:
            if self.room_wanted is not None:
                self.check_reader()  # no write to fail and tell
            with memoryview(self.pending) as view:
                written = self._write(view)
            del self.pending[:written]

    def _write(self, data: Block) -> int:
        """Write data; return how much a full pipe took, or raise."""
        if self.console is not None:
            try:
                self.console.write(data)
                self.console.flush()
            except OSError as exc:
                self.pending = bytearray(data)
                raise OutputFailed("cannot write to stdout: %s"
                                   % exc.strerror)
            return len(data)
        if self.before_write is not None and not self.before_write():
            return 0  # flush() goes on once the status line is whole
        view = memoryview(data)
        total = 0
        while total < len(view):
            size = len(view) - total
            if self.flags is not None:
                size = self.fitting(view[total:])
                if not size:
                    return total  # flush() goes on when there is room
            try:
                written = write_now(self.fd, view[total:total + size],
                                    self.flags)
            except BlockingIOError:
                return total  # the pipe is full: flush() goes on later
            except OSError as exc:
                total = self.untear(data, total)
                self.pending = bytearray(view[total:])
                if exc.errno == errno.EPIPE:
                    self.count_lost()
                error = OutputFailed("cannot write to %s: %s" % (
                    self.name, exc.strerror))
                error.hung_up = self.terminal and exc.errno == errno.EIO
                raise error
            if self.flags is not None:
                self.wrote(view[total:total + written],
                           total + written == len(view))
            total += written
        return total

    def wrote(self, piece: memoryview, to_the_end: bool) -> None:
        """Note a write to a pipe, socket or terminal: where it stopped,
        and what a pipe holds."""
        if to_the_end:
            self.lines_in, self.mid_line = 0, False  # data is whole events
        elif self.lines_per_event == 1:
            self.mid_line = piece[-1] != 10  # b"\n"
        else:
            # A part: a pipe's whole events, a short write to a terminal.
            text = bytes(piece)
            self.lines_in = (self.lines_in + text.count(b"\n")) % \
                self.lines_per_event
            self.mid_line = not text.endswith(b"\n")
        if self.in_pipe is not None:
            self.sent_bytes += len(piece)
            # The receive buffer that raw events are views of is read into
            # again: keep a copy.  Formatted events are bytes of their own.
            if not isinstance(piece.obj, bytes):
                piece = bytes(piece)
            self.in_pipe.append((self.sent_bytes, piece))

    def fitting(self, data: Block) -> int:
        """Return how much of data to write into the pipe now: whole events
        only, each once it fits whole, so that a reader that never comes
        back finds no event cut short; 0 to wait for room (room_wanted)."""
        state = pipe_state(self.fd)
        if state is None:
            return len(data)
        size, unread = state
        in_pipe = self.in_pipe
        if in_pipe is None:  # a pipe that F_GETPIPE_SZ failed on before
            return len(data)
        taken = self.sent_bytes - unread
        while in_pipe and in_pipe[0][0] <= taken:
            in_pipe.popleft()
        # A pipe holds pages, and each write may leave part of one unused.
        room = size - unread - (len(in_pipe) + 1) * PAGE
        if self.room_wanted is not None:
            if room < self.room_wanted:
                return 0  # the event that waits still does not fit
            self.room_wanted = None
        if len(data) <= room:
            return len(data)
        # Nearly full: whole events of up to PIPE_BUF bytes, which a pipe
        # takes whole or not at all.
        whole = event_boundary(bytes(data[:max(room, select.PIPE_BUF)]),
                               self.lines_per_event, self.lines_in)
        if whole:
            return whole
        # The next event does not fit now: wait until it does, polled, for
        # select() says a pipe takes more once it has one page free.
        need = first_event_end(data, self.lines_per_event, self.lines_in)
        if need + 2 * PAGE > size:
            size = widen_pipe(self.fd, need + 2 * PAGE) or size
        if need + 2 * PAGE <= size:
            self.room_wanted = need + PAGE
            return 0
        # Larger than the pipe can ever hold: it goes in pieces, torn if
        # the reader stops in its middle.
        if room < select.PIPE_BUF:
            self.room_wanted = size // 4
            return 0
        if self.warn is not None and not self.oversize_warned:
            self.oversize_warned = True
            self.warn("an event of %s is larger than %s's pipe (%s): such "
                      "events go out in parts, cut short if the reader "
                      "stops before their end (said once)" % (
                          format_bytes(need), self.name, format_bytes(size)))
        return room

    def count_lost(self) -> None:
        """Count what the pipe's reader left unread when it went: bytes,
        and events it did not take whole."""
        unread = unread_count(self.fd) if self.in_pipe is not None else 0
        if not unread:
            return
        lines, left = 0, unread
        for _, piece in reversed(self.in_pipe):
            part = bytes(piece[-left:]) if left < len(piece) else piece
            lines += bytes(part).count(b"\n")
            left -= len(part)
            if left <= 0:
                break
        self.unread_lost = unread
        self.events_lost = -(-lines // self.lines_per_event)
        self.in_pipe.clear()

    def untear(self, data: Block, written: int) -> int:
        """Cut a file back to the last whole event of what was written of
        data; return how much of data is left in it."""
        whole = event_boundary(bytes(data[:written]), self.lines_per_event)
        if whole < written:
            try:
                size = os.fstat(self.fd).st_size
                os.ftruncate(self.fd, size - (written - whole))
            except OSError:
                return written  # not a file (a pipe): nothing to take back
        return whole

    def pending_events(self) -> int:
        """Return how many events were handed over and not written whole."""
        lines = self.pending.count(b"\n")
        return -(-lines // self.lines_per_event)

    def shares_stderr(self) -> bool:
        """Tell whether stderr is the very file events go to (a terminal,
        2>&1 into a pipe)."""
        try:
            ours, theirs = os.fstat(self.fd), os.fstat(2)
        except OSError:
            return False
        return (ours.st_dev, ours.st_ino) == (theirs.st_dev, theirs.st_ino)

    def close(self) -> None:
        if self.path:
            os.close(self.fd)


def stream_flags(fd: int) -> Optional[int]:
    """Return the file status flags of fd if a reader can stall it (a pipe,
    a socket, a terminal: written without waiting, see write_now), else
    None (a file, which never stalls; or Windows, where select() cannot
    watch pipes)."""
    try:
        import fcntl
        import stat
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or
                os.isatty(fd)):
            return None
        return fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK
    except (ImportError, OSError, AttributeError):
        return None


def widen_pipe(fd: int, size: int = PIPE_SIZE) -> Optional[int]:
    """Let a pipe we write to hold size bytes, a whole read's events by
    default (Linux); return its size, or None where it has none."""
    # With the default 64 KiB, a 512 KiB batch takes eight rounds of
    # waiting for the reader; a larger pipe also rides out its pauses.
    try:
        import fcntl
        import stat
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return None
        if fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ) < size:
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, size)
        return fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)
    except (ImportError, AttributeError, OSError):
        return None  # not Linux, or above /proc/sys/fs/pipe-max-size


def pipe_reader_gone(fd: int) -> bool:
    """Tell whether the reader of the pipe we write to went away."""
    try:
        poller = select.poll()
        poller.register(fd, 0)  # POLLERR and POLLHUP come unasked
        return bool(poller.poll(0))
    except (AttributeError, OSError, ValueError):
        return False  # no poll() (Windows): the next write tells


def pipe_state(fd: int) -> Optional[tuple]:
    """Return a pipe's (size, bytes unread) (Linux), or None."""
    try:
        import fcntl
        size = fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)
    except (ImportError, AttributeError, OSError):
        return None
    unread = unread_count(fd)
    return None if unread is None else (size, unread)


def unread_count(fd: int) -> Optional[int]:
    """Return how many bytes wait unread in a pipe or socket, or None where
    the system cannot tell."""
    try:
        import fcntl
        import termios
        answer = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
    except (ImportError, AttributeError, OSError):
        return None
    return int.from_bytes(answer, sys.byteorder)


def write_now(fd: int, data: Block, flags: Optional[int]) -> int:
    """Write what fd takes now; BlockingIOError if a pipe takes nothing."""
    if flags is None:
        return os.write(fd, data)
    # Non-blocking for this one write only: the pipe's other users (a
    # shell's "2>&1", a later command) expect it blocking, as it was.
    import fcntl
    fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
    try:
        return os.write(fd, data)
    finally:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags)


def event_boundary(data: bytes, lines_per_event: int,
                   lines_before: int = 0) -> int:
    """Return where the last whole event in data ends; data starts
    lines_before lines into an event."""
    cut = data.rfind(b"\n") + 1
    while cut and (data.count(b"\n", 0, cut) + lines_before) % \
            lines_per_event:
        cut = data.rfind(b"\n", 0, cut - 1) + 1
    return cut


def first_event_end(data: Block, lines_per_event: int,
                    lines_before: int = 0) -> int:
    """Return where the first event in data ends (data starts lines_before
    lines into it), or len(data)."""
    data = bytes(data)
    cut = 0
    for _ in range(lines_per_event - lines_before):
        cut = data.find(b"\n", cut) + 1
        if not cut:
            return len(data)
    return cut


def binary_stdout() -> int:
    """Return fd 1, set to write bytes as they are (no "\\r\\n" on Windows)."""
    try:
        import msvcrt
        msvcrt.setmode(1, os.O_BINARY)
    except (ImportError, OSError):
        pass  # not Windows (always binary), or no stdout at all
    return 1


class Handover:
    """The Output of an EmbeddedListener: blocks go to a function."""

    path = None
    terminal = False
    reopen_failed = None
    pending = b""
    events_lost = unread_lost = 0

    def __init__(self, take: Callable[[bytes, str], None]) -> None:
        self.take = take

    def write(self, data: Block, peer: str = "") -> None:
        self.take(bytes(data), peer)

    def flush(self) -> None:
        pass

    def stalled(self) -> bool:
        return False

    def pending_events(self) -> int:
        return 0

    def reopen_due(self) -> bool:
        return False

    def watched_pipe(self) -> Optional[int]:
        return None

    def shares_stderr(self) -> bool:
        return False

    def close(self) -> None:
        pass


class EventSink:
    """Count, format and write blocks of events; stop at --count.

    While the output stalls, at most OUTPUT_BACKLOG formatted bytes wait
    in it; later blocks wait as received, formatted as it takes them.
    """

    def __init__(self, settings: Settings, output, console: Console) -> None:
        self.output = output
        self.console = console
        self.format = formatter(settings.format, settings.escape)
        # Only JSON says which events are pieces.
        self.marks_pieces = settings.format == "json"
        self.escape = settings.escape or output.terminal
        self.limit = settings.count
        self.events = 0
        # Events received beyond --count: read, but not written.
        self.beyond_count = 0
        # Blocks not formatted yet, as (block, events, peer, when, listen).
        self.waiting = collections.deque()
        self.waiting_events = 0
        output.warn = console.warn
        if output.shares_stderr():
            # Status lines, and the live line, go between whole events.
            console.gate = output.mid_event
            output.before_write = console.send_unsent

    def full(self) -> bool:
        """Tell whether --count events were written."""
        return bool(self.limit) and self.events >= self.limit

    def emit(self, block: Block, peer: str, marks=NO_MARKS,
             listen: str = "") -> int:
        """Format and write a block of events from peer, received at listen
        (its label or address), at once; return how many of its events
        were handed to the output.  marks: the pieces of split events in
        it (EventFramer.marks)."""
        lines = split_lines(block)
        if self.full():
            self.beyond_count += len(lines)
            return 0
        if self.limit and self.events + len(lines) >= self.limit:
            self.beyond_count += len(lines) - (self.limit - self.events)
            del lines[self.limit - self.events:]
            block = b"".join(lines)
        self.events += len(lines)
        if self.waiting or len(self.output.pending) >= OUTPUT_BACKLOG:
            self.waiting.append((bytes(block), len(lines), peer,
                                 time.time(), marks, listen))
            self.waiting_events += len(lines)
            return len(lines)
        self.deliver(block, lines, peer, time.time(), marks, listen)
        return len(lines)

    def deliver(self, block: Block, lines: list, peer: str,
                when: float, marks=NO_MARKS, listen: str = "") -> None:
        """Format a block of events and hand it to the output."""
        if self.console.shown and self.output.terminal:
            self.console.clear()
        if self.output.reopen_due():
            self.reopen()
        if marks and self.marks_pieces:
            data = self.format(block, lines, peer, when, self.escape, marks,
                               listen)
        else:
            data = self.format(block, lines, peer, when, self.escape,
                               listen=listen)
        self.output.write(data, peer)

    def flush(self) -> None:
        """Write what waits, as much as the output takes now; then the
        status lines held while an event was half-written."""
        output = self.output
        output.flush()
        while self.waiting and len(output.pending) < OUTPUT_BACKLOG:
            block, events, peer, when, marks, listen = \
                self.waiting.popleft()
            self.waiting_events -= events
            self.deliver(block, split_lines(block), peer, when, marks,
                         listen)
        self.console.release()

    def reopen(self) -> None:
        """Open --output anew (SIGHUP, or a reopen that failed), say so."""
        output = self.output
        if not output.path:
            self.console.status("SIGHUP: writing to stdout, no file to "
                                "reopen")
            return
        retry = output.reopen_failed is not None
        why = output.reopen()
        if why is None:
            self.console.status("Reopened " + output.name)
        elif not retry:
            self.console.warn("cannot reopen %s: %s; still writing to the "
                              "file it was, trying again on the next SIGHUP "
                              "or write" % (output.name, why))

    def unwritten(self) -> int:
        """Return how many events were handed over and are not written
        whole, or were left in a pipe whose reader went."""
        return self.output.pending_events() + self.waiting_events + \
            self.output.events_lost

    def written(self) -> int:
        """Return how many events were written whole."""
        return self.events - self.unwritten()

    def not_written(self) -> int:
        """Return how many events were received and not written."""
        return self.beyond_count + self.unwritten()


# --- The counters: the live line, --stats and SIGUSR1 ------------------------

class Stats:
    """Report the counters: live on a terminal, every --stats SECONDS, and
    at once on SIGUSR1 (as dd does).

    A timer of the serving loop, as Sweeper and Throttle are: the loop
    calls fire() once due() comes, on the wake-ups it has anyway.
    counters() returns (events, bytes, open connections).
    """

    def __init__(self, counters: Callable[[], tuple], console: Console,
                 every: Optional[float] = None) -> None:
        now = time.monotonic()
        self.counters = counters
        self.console = console
        self.started = now
        self.every = every
        self.next_line = now + every if every else float("inf")
        self.next_draw = now + LIVE_SECONDS if console.live else float("inf")
        self.meter = RateMeter(now)
        # A line's rate is since the line before: a meter of two samples.
        self.line_meter = RateMeter(now, 2)

    def due(self) -> Optional[float]:
        """Return when fire() is next needed; None for never."""
        due = min(self.next_line, self.next_draw)
        return None if due == float("inf") else due

    def fire(self, now: float) -> None:
        """Redraw the live line, print the --stats line: what is due."""
        if now >= self.next_draw:
            self.draw(now)
            self.next_draw = now + LIVE_SECONDS
        if now >= self.next_line:
            self.print_line(now)
            self.next_line = max(self.next_line + self.every, now)

    def draw(self, now: float) -> None:
        events, size, connections = self.counters()
        self.console.show("%s  %s open  %s" % (
            format_progress(events, size, self.meter.rate(now, events)),
            plural(connections, "connection"),
            format_duration(now - self.started)))

    def print_line(self, now: Optional[float] = None) -> None:
        """Print the counters as an ordinary line (for logs)."""
        now = time.monotonic() if now is None else now
        events, size, connections = self.counters()
        since = self.line_meter.samples[-1][0]
        rate = self.line_meter.rate(now, events)
        self.console.line("Stats after %s: %s, %s received, %s/s over the "
                          "last %s, %s open" % (
                              format_duration(now - self.started),
                              plural(events, "event"), format_bytes(size),
                              format_count(round(rate)),
                              format_duration(now - since),
                              plural(connections, "connection")))


# --- Settings and the command line -------------------------------------------

class Settings:
    """What the listener does, from its command line or its embedder:
    Settings(listen=(host, port), format="raw", ...); the rest defaults."""

    listen = (LISTEN_ADDR, LISTEN_PORT)  # or a list of Listen
    format = "text"
    output = None
    allow = None  # networks, or None for any
    max_connections = MAX_CONNECTIONS
    max_per_host = None
    per_host_prefix = PER_HOST_PREFIX
    remote_pipe_clients = False
    idle_timeout = None
    event_timeout = EVENT_TIMEOUT
    max_event_bytes = MAX_EVENT_BYTES
    max_buffer_bytes = MAX_BUFFER_BYTES
    file_mode = FILE_MODE
    socket_mode = SOCKET_MODE
    count = None
    timeout = None
    stats = None
    escape = False
    prefix = None  # PREFIX_FIELDS to put before each raw or text event
    quiet = False

    def __init__(self, **given) -> None:
        for name, value in given.items():
            known = hasattr(Settings, name) and not name.startswith("_")
            if not known or callable(getattr(Settings, name)):
                raise TypeError("no setting %r" % name)
            setattr(self, name, value)

    @classmethod
    def from_arguments(cls, args: argparse.Namespace) -> "Settings":
        return cls(**vars(args))


def parse_mode(text: str) -> int:
    """Convert an octal file mode (0640, 640) to a number, in words when it
    fails."""
    digits = text[2:] if text[:2] in ("0o", "0O") else text
    if not digits or not digits.isascii() or \
            any(char not in "01234567" for char in digits):
        raise ValueError("not an octal mode (such as 0640)")
    mode = int(digits, 8)
    if mode > 0o777:
        raise ValueError("must be from 0000 to 0777 (permissions only)")
    return mode


def _file_name(text: str) -> str:
    if not text:
        # An empty name is a slip (an unset shell variable), not stdout.
        raise argparse.ArgumentTypeError("empty file name")
    return text


def build_parser() -> argparse.ArgumentParser:
    """Describe the command line."""
    seconds = argument_type(bounded(float, *SECONDS), "seconds")
    parser = OneLineParser(
        description="Listen for events from Kaspersky CyberTrace (set its "
        "OutputSettings > ConnectionString to this address) and print them: "
        "events to stdout, status to stderr.",
        epilog="Ctrl+C or SIGTERM (on Windows: Ctrl+C or Ctrl+Break) stops "
        "after writing out everything already received; SIGHUP reopens "
        "--output (for logrotate), or stops when events go to a terminal "
        "(it hung up), and SIGUSR1 prints the counters (Windows has "
        "neither: restart the listener for a new file, use --stats for "
        "counters). Exit status: 0 on a normal stop, 1 on an error (events "
        "that could not be written are counted in the last status line; "
        "also when --count was not reached before --timeout), 2 on bad "
        "arguments.")
    parser.add_argument(
        "-l", "--listen", metavar="[LABEL=]ADDR", action="append",
        type=argument_type(parse_listen, "address"),
        help="address to listen on, as in CyberTrace's ConnectionString: "
        "192.0.2.105:9998, [::1]:9998, a host name, or a bare PORT; port 0 "
        "picks a free one; unix:/PATH for a UNIX stream socket (Linux, "
        "macOS); on Windows a named pipe, \\\\.\\pipe\\NAME. Repeat it to "
        "listen at several addresses at once, each event marked with where "
        "it arrived: LABEL=ADDR names it so (alerts=0.0.0.0:9997), else its "
        "address does (default: %s)" % format_address(LISTEN_ADDR,
                                                       LISTEN_PORT))
    parser.add_argument(
        "--socket-mode", metavar="MODE",
        type=argument_type(parse_mode, "mode"), default=None,
        help="permissions of a unix:/PATH socket, in octal, whatever the "
        "umask: who may connect and send events (default: %04o, any local "
        "user, as syslog-ng's unix-stream() and as the loopback TCP "
        "default; 0660: owner and group). --allow does not apply to "
        "UNIX sockets. A socket file left by a listener that is gone is "
        "replaced; the socket is removed on exit" % SOCKET_MODE)
    parser.add_argument(
        "--remote-pipe-clients", action="store_true",
        help="let clients on other computers connect to a -l \\\\.\\pipe\\"
        "NAME (by default the pipe refuses them, as the default address "
        "is loopback: PIPE_REJECT_REMOTE_CLIENTS); --allow does not apply "
        "to a pipe's clients")
    parser.add_argument(
        "-f", "--format", choices=FORMATS, default="text",
        help="text: 'Received:' lines, as Kaspersky's tutorial prints them; "
        "raw: one event per line, nothing else; json: JSON Lines with "
        "time, peer, listen, kind, event and its fields (default: text)")
    parser.add_argument(
        "-o", "--output", metavar="FILE",
        type=_file_name,
        help="append events to FILE instead of stdout; SIGHUP reopens it "
        "(not on Windows)")
    parser.add_argument(
        "--file-mode", metavar="MODE",
        type=argument_type(parse_mode, "mode"), default=None,
        help="permissions of a FILE that -o or a reopen creates, in octal, "
        "whatever the umask; a file that exists keeps its own (default: "
        "%04o: owner and group)" % FILE_MODE)
    parser.add_argument(
        "--escape", action="store_true",
        help="show control characters (ESC, BEL, ...) as \\xNN text in "
        "files and pipes too, as on a terminal, so that 'cat FILE' or "
        "'jq -r' cannot pass an event's terminal commands on")
    parser.add_argument(
        "--prefix", metavar="FIELDS",
        type=argument_type(parse_event_prefix, "fields"),
        help="start each event's line (-f raw, or the event line of -f "
        "text) with these fields, comma-separated, in the order given, each "
        "followed by a space: time (when it was received, ISO 8601 UTC: "
        "2026-12-07T23:01:02.123Z), peer (who sent it: 10.0.0.5:51234, "
        "[2001:db8::5]:51234), listen (where it came in: the label of its "
        "-l, or the address as bound: 0.0.0.0:9998); white space and %% in a "
        "field as %%XX; e.g. --prefix time,peer; not with -f json, whose "
        "lines have time, peer and listen members")
    parser.add_argument(
        "--allow", metavar="CIDR", action="append",
        type=argument_type(parse_network, "network"),
        help="accept connections only from this network (repeatable), "
        "e.g. 192.0.2.0/24 or ::1; others are closed and counted")
    parser.add_argument(
        "--max-connections", metavar="N",
        type=argument_type(bounded(int, 1, MAX_CONNECTIONS_LIMIT), "N"),
        default=MAX_CONNECTIONS,
        help="connections served at once; when all are taken, one silent "
        "for %g s gives its place to a peer that waits, and the others "
        "wait in the kernel's queue until one closes (default: %d; on "
        "Windows at most %d, all that select() watches there)"
        % (EVICT_IDLE_SECONDS, MAX_CONNECTIONS, WINDOWS_SELECT_SOCKETS - 2))
    parser.add_argument(
        "--max-per-host", metavar="N",
        type=argument_type(bounded(int, 1, MAX_CONNECTIONS_LIMIT), "N"),
        help="connections served at once from one host; more from it are "
        "refused (default: as many as --max-connections)")
    parser.add_argument(
        "--per-host-prefix", metavar="V4/V6",
        default=None,
        type=argument_type(parse_prefixes, "prefix lengths"),
        help="what --max-per-host counts as one host: peers whose addresses "
        "share this many leading bits (default: %d/%d, one IPv4 address, "
        "an IPv6 /64; 24/48 counts a whole /24 or /48 as one)"
        % PER_HOST_PREFIX)
    parser.add_argument(
        "--idle-timeout", metavar="SECONDS", type=seconds,
        help="close a connection that sends nothing for SECONDS "
        "(default: never)")
    parser.add_argument(
        "--event-timeout", metavar="SECONDS", type=seconds,
        default=EVENT_TIMEOUT,
        help="close a connection whose event is not finished (no newline) "
        "SECONDS after its first byte, however slowly it trickles in; "
        "what came is printed (default: %g)" % EVENT_TIMEOUT)
    parser.add_argument(
        "--max-event-bytes", metavar="N",
        type=argument_type(bounded(int, 1, MAX_EVENT_BYTES_LIMIT), "N"),
        default=MAX_EVENT_BYTES,
        help="split a longer event into pieces of at most N bytes, each "
        "printed as an event, with a warning (default: %d, at most %d)"
        % (MAX_EVENT_BYTES, MAX_EVENT_BYTES_LIMIT))
    parser.add_argument(
        "--max-buffer-bytes", metavar="N",
        type=argument_type(bounded(int, 1, MAX_BUFFER_BYTES_LIMIT), "N"),
        default=MAX_BUFFER_BYTES,
        help="hold at most N bytes of unfinished events (no newline yet) "
        "across all connections; past it, the largest are printed in "
        "pieces, with a warning, as --max-event-bytes does; this keeps "
        "memory bounded whatever peers send (default: %d, 64 MiB)"
        % MAX_BUFFER_BYTES)
    parser.add_argument(
        "-n", "--count", metavar="N",
        type=argument_type(bounded(int, 1, COUNT_LIMIT), "N"),
        help="stop after N events (exit 0)")
    parser.add_argument(
        "-t", "--timeout", metavar="SECONDS", type=seconds,
        help="stop after SECONDS (exit 0; exit 1 if --count was given and "
        "not reached)")
    parser.add_argument(
        "--stats", metavar="SECONDS", type=seconds,
        help="print a status line with the counters (events, bytes, events/s, "
        "open connections) every SECONDS, for logs; even with -q. SIGUSR1 "
        "prints one at once (not on Windows)")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="print no status lines (and no live line on a "
                        "terminal), only errors, warnings and --stats")
    parser.add_argument("--version", action="version",
                        version="%(prog)s " + __version__)
    return parser


# --- Peers: who is let in, their reading and deadlines, the listening socket -

class Throttle:
    """Print at most a few lines of a kind every window of seconds, then
    one line that counts the rest, as rsyslog's rate limiting does: peers
    coming and going by the thousand must not flood the log.

    say(kind, line) prints (with show) or counts; summary(counts, seconds)
    words what was counted ({kind: count}) over the seconds of a window.
    """

    def __init__(self, show: Callable[[str], None], lines: int,
                 window: float, summary: Callable[[dict, float], str]) -> None:
        self.show = show
        self.lines = lines
        self.window = window
        self.summary = summary
        self.started = self.ends = 0.0
        self.shown = 0
        self.hidden = collections.Counter()

    def say(self, kind: str, line: str, count: int = 1) -> None:
        """Print line, or count it as count of kind."""
        now = time.monotonic()
        if now >= self.ends:
            self.flush(now)
            self.started, self.ends = now, now + self.window
            self.shown = 0
        if self.shown < self.lines:
            self.shown += 1
            self.show(line)
        else:
            self.hidden[kind] += count

    def due(self) -> Optional[float]:
        """Return when fire() has a line to print, or None."""
        return self.ends if self.hidden else None

    def fire(self, now: float) -> None:
        self.flush(now)

    def flush(self, now: Optional[float] = None) -> None:
        """Print the count of the lines not shown one by one."""
        if self.hidden:
            now = time.monotonic() if now is None else now
            self.show(self.summary(
                dict(self.hidden), min(now, self.ends) - self.started))
            self.hidden.clear()


def say_rejected(counts: dict, seconds: float) -> str:
    rejected = counts["rejected"]
    return "Rejected %s in the last %s (not shown one by one)" % (
        plural(rejected, "more connection", "more connections"),
        format_duration(seconds))


def say_splits(counts: dict, seconds: float) -> str:
    why = []
    if counts.get("split"):
        why.append("%s longer than --max-event-bytes" % plural(
            counts["split"], "more event"))
    if counts.get("budget"):
        why.append("%s past --max-buffer-bytes" % plural(
            counts["budget"], "more event"))
    return "%s split in the last %s (not shown one by one)" % (
        " and ".join(why), format_duration(seconds))


def say_connections(counts: dict, seconds: float) -> str:
    opened = counts.get("opened", 0)
    return "%s opened and %s closed in the last %s (not shown one by one)" \
        % (plural(opened, "more connection", "more connections"),
           format_count(counts.get("closed", 0)), format_duration(seconds))


class Admission:
    """Let peers in: take them from the accept queue while a place is free,
    refuse those --allow or --max-per-host keep out (counted, and said
    without flooding the log), and stop taking while every place is taken.
    """

    backlog = 1024

    def __init__(self, settings: Settings, console: Console,
                 selector: selectors.BaseSelector) -> None:
        self.allow = settings.allow
        self.max_connections = settings.max_connections
        self.max_per_host = settings.max_per_host
        self.per_host_prefix = settings.per_host_prefix
        self.console = console
        self.selector = selector
        self.places = []  # open, each registered while accepting
        self.on_ready = None
        self.accepting = True
        self.per_host = collections.Counter()
        self.accepted = self.rejected = 0
        self.first_rejected = ""
        self.refusals = Throttle(console.status, REJECT_LINES, REJECT_WINDOW,
                                 say_rejected)
        self.full_warned = -REJECT_WINDOW  # when every place was last taken
        # Out of descriptors: the --max-connections to come back to, the
        # count served meanwhile, and when to try for more again.
        self.limit = self.lowered_to = self.retry_at = None

    @property
    def server(self) -> Optional[socket.socket]:
        """The first place's listening socket (an embedder's only one)."""
        return self.places[0].server if self.places else None

    def open(self, places: list,
             on_ready: Callable[[Place], None]) -> None:
        """Listen at every place, or at none (raise the first failure);
        on_ready(place) runs when peers wait to connect there."""
        self.fit_selector()
        try:
            for place in places:
                try:
                    place.open(self.backlog)
                except UserError as exc:
                    if place.label:
                        exc.args = ("%s (-l %s=...)" % (exc, place.label),)
                    raise
                self.places.append(place)
        except BaseException:
            for place in places:
                place.close()
            self.places = []
            raise
        self.on_ready = on_ready
        for place in self.places:
            self.selector.register(place.server, selectors.EVENT_READ,
                                   functools.partial(on_ready, place))

    def take(self, open_connections: int,
             place: Place) -> Optional[tuple]:
        """Take the next peer that may be served from place's accept
        queue: (socket, address), or None when the queue is empty."""
        while True:
            try:
                sock, address = place.accept()
            except (BlockingIOError, InterruptedError):
                return None
            except OSError as exc:
                # A peer that reset before we took it, or out of
                # descriptors: either way the listener goes on.
                if exc.errno in OUT_OF_DESCRIPTORS:
                    self.out_of_descriptors(open_connections)
                    if not open_connections:
                        time.sleep(0.1)  # no close will wake us: no spin
                return None
            peer, host = place.peer_of(sock, address)
            why = self.refusal(host, place)
            if why is None:
                self.recovered(open_connections)
                sock.setblocking(False)
                return sock, address
            self.reject(peer, why, place)
            sock.close()

    def pause(self, open_connections: int) -> None:
        """Stop taking peers while every place is taken; they wait in the
        kernel's queue."""
        if self.accepting and self.full(open_connections):
            self.accepting = False
            for place in self.places:
                self.selector.unregister(place.server)
            now = time.monotonic()
            # Once a window: peers coming and going at the limit would
            # print it each time.
            if now >= self.full_warned + REJECT_WINDOW:
                self.full_warned = now
                self.console.warn(
                    "%s open (--max-connections); new ones wait until one "
                    "closes or has been silent for %g s" % (
                        plural(open_connections, "connection"),
                        EVICT_IDLE_SECONDS))

    def resume(self) -> None:
        """Take peers again: a place is free."""
        if not self.accepting and self.places:
            self.accepting = True
            for place in self.places:
                self.selector.register(
                    place.server, selectors.EVENT_READ,
                    functools.partial(self.on_ready, place))

    @property
    def paused(self) -> bool:
        """Tell whether it stopped taking peers: every place is taken."""
        return not self.accepting

    def peer_waiting(self) -> bool:
        """Tell whether a peer waits while every place is taken."""
        return self.paused and any(readable_now(place.server)
                                   for place in self.places)

    def close(self) -> None:
        """Stop listening: no more peers (a UNIX socket's file goes)."""
        for place in self.places:
            if self.accepting:
                self.selector.unregister(place.server)
            place.close()
        self.places = []

    def refusal(self, host: str, place: Place) -> Optional[str]:
        """Return why a peer from host may not connect to place, or None."""
        if self.allow and place.takes_allow and not self.allowed(host):
            return ""
        host = self.host_of(host)
        if self.max_per_host and self.per_host[host] >= self.max_per_host:
            return ": %s from %s already (--max-per-host)" % (
                plural(self.per_host[host], "connection"), host)
        return None

    def allowed(self, host: str) -> bool:
        """Tell whether a peer from host may connect (--allow)."""
        if not self.allow:
            return True
        ip = ip_of(host)
        if ip.version == 6 and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self.allow)

    def host_of(self, host: str) -> str:
        """Return what --max-per-host counts a peer from host under."""
        if host.startswith(UNIX_PREFIX):
            return host  # the local processes of a UNIX socket: one host
        return host_key(peer_host(host), self.per_host_prefix)

    def joined(self, conn: Connection) -> None:
        self.accepted += 1
        conn.place.accepted += 1
        self.per_host[self.host_of(conn.host)] += 1

    def left(self, conn: Connection) -> None:
        host = self.host_of(conn.host)
        self.per_host[host] -= 1
        if not self.per_host[host]:
            del self.per_host[host]

    def full(self, open_connections: int) -> bool:
        return open_connections >= self.max_connections

    def reject(self, peer: str, why: str, place: Place) -> None:
        """Count a peer refused, and say so (a few lines a window)."""
        self.rejected += 1
        place.rejected += 1
        self.first_rejected = self.first_rejected or peer
        if len(self.places) > 1:
            peer += " at " + place.shown
        self.refusals.say("rejected", "Rejected connection from %s%s"
                          % (peer, why))

    def out_of_descriptors(self, open_connections: int) -> None:
        """Serve no more than are open now, for a while: the system has no
        descriptor left for another."""
        if self.limit is None:  # said once a shortage, not every retry
            self.limit = self.max_connections
            self.console.warn("out of file descriptors; serving %s until "
                              "more are free" % plural(
                                  max(1, open_connections), "connection"))
        self.max_connections = self.lowered_to = max(1, open_connections)
        self.retry_at = time.monotonic() + DESCRIPTOR_RETRY_SECONDS

    def due(self) -> Optional[float]:
        """Return when to try for descriptors again, or None."""
        return self.retry_at

    def fire(self, now: float) -> None:
        # As nginx does on EMFILE: try again a moment later, for
        # descriptors come back as other processes or peers close theirs.
        self.retry_at = None
        self.max_connections = self.limit
        self.resume()

    def recovered(self, open_connections: int) -> None:
        """Say that descriptors came back, once a peer past the shortage's
        count is in."""
        if self.lowered_to is not None \
                and open_connections >= self.lowered_to \
                and self.retry_at is None:
            self.console.status("file descriptors free again: serving up to "
                                "%d connections (--max-connections)"
                                % self.limit)
            self.limit = self.lowered_to = None

    def fit_selector(self) -> None:
        """Lower --max-connections to what the selector can watch."""
        most = selector_capacity(self.selector)
        asked = self.max_connections
        if most is None or asked <= most:
            return
        if asked != MAX_CONNECTIONS:  # the default is no one's request
            self.console.warn("--max-connections %d: select() here watches "
                              "at most %d connections; serving %d at once"
                              % (asked, most, most))
        self.max_connections = most


def selector_capacity(selector: selectors.BaseSelector) -> Optional[int]:
    """Return how many peers the selector can watch, or None if unbounded."""
    if os.name == "nt" and isinstance(selector, selectors.SelectSelector):
        return WINDOWS_SELECT_SOCKETS - 2  # the listening and signal sockets
    return None


class Connection:
    """One peer: its socket, its framing, when it last sent and when its
    unfinished event began."""

    def __init__(self, sock: socket.socket, address,
                 max_event_bytes: int, place: Optional[Place] = None,
                 named: bool = False) -> None:
        self.sock = sock
        self.place = place or TcpPlace(address[:2])
        self.address = address[:2] if isinstance(address, tuple) else address
        self.peer, self.host = self.place.peer_of(sock, address)
        # Where it arrived: the label of its -l, or the address.  Marks
        # its events (JSON's "listen") wherever a format names it.
        self.listen = self.place.listen
        # How status lines name it: with where it arrived when there are
        # several places (named).
        self.where = self.peer
        if named and not self.place.peer_names_place:
            self.where += " at " + self.place.shown
        elif named and self.place.label:
            self.where += " at " + self.place.label
        self.framer = EventFramer(max_event_bytes)
        self.events = 0
        self.last_active = time.monotonic()
        self.event_started = None
        # Given up its place (see Sweeper.retire): since when, and why.
        self.retired_at = None
        self.retired_for = ""
        # What its reads cost (see FairShare): seconds and bytes, both
        # decayed read by read, and the seconds it took beyond its share.
        self.spent = 0.0
        self.got = 0.0
        self.debt = 0.0

    def read(self, buffer: bytearray, size: int):
        """Read once into buffer: return a block of whole events (maybe
        empty), None when the peer closed, or raise OSError (reset)."""
        block = self.framer.read(self.sock.recv_into, buffer, size)
        if block is not None:
            now = self.last_active = time.monotonic()
            if not self.framer.pending:
                self.event_started = None
            elif block or self.event_started is None:
                self.event_started = now  # an event began in this read
        return block

    def overdue(self, now: float, idle_timeout: Optional[float],
                event_timeout: float) -> str:
        """Return why the connection should close now, or ""."""
        if idle_timeout and now - self.last_active >= idle_timeout:
            return "idle for %g s" % idle_timeout
        if self.event_started is not None and \
                now - self.event_started >= event_timeout:
            return "event unfinished after %g s" % event_timeout
        return ""

    @property
    def held(self) -> int:
        """Bytes of an unfinished event held for this peer."""
        return len(self.framer.pending)


class BufferBudget:
    """Keep the bytes of unfinished events, over every connection, within
    --max-buffer-bytes: past it, the largest go out in pieces."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held_bytes = 0
        # Given up as pieces since glibc last returned freed memory.
        self.released = 0

    def change(self, delta: int) -> bool:
        """Count held bytes gained or lost; tell whether over the budget."""
        self.held_bytes += delta
        return self.held_bytes > self.limit

    def pieces(self, connections, stop: Callable[[], bool]):
        """Yield (connection, piece, first) from the largest unfinished
        events until the rest fit, or stop() says enough; first tells that
        the piece is its event's first."""
        # Counted afresh: a connection dropped on an internal error left
        # its bytes in the running total.
        self.held_bytes = sum(conn.held for conn in connections)
        while self.held_bytes > self.limit and not stop():
            conn = max(connections, key=lambda conn: conn.held)
            splits = conn.framer.split_events
            piece = conn.framer.release()
            if not piece:
                return
            self.held_bytes -= len(piece) - 1
            self.released += len(piece)
            yield conn, piece, conn.framer.split_events != splits
        # Under this pressure unfinished events of every size come and go,
        # and glibc keeps the freed blocks between them mapped: RSS would
        # grow well past the budget without a trim now and then.
        if self.released >= self.limit // 16:
            self.released = 0
            return_freed_memory()


class FairShare:
    """Share the loop between busy peers by what their reads cost in time,
    not by reads: a peer whose events are dear (JSON's general path, ever
    new shapes, look-alikes, tiny events) gets fewer bytes a round.

    Each peer's cost per byte is kept from its last few reads.  The
    cheapest busy peer reads its full size; the others read as much as
    costs about as long (slack times over), at least min_read; a read
    that cost more than that anyway (one long dear event) is owed, and
    the peer sits out rounds while others wait until it is paid (deficit
    round robin, timed).  A lone peer reads at full size: nobody waits.
    """

    # Small enough that one dear read stays well under a millisecond or
    # two (4 KiB of JSON's general path: 1.6 ms), large enough that a
    # newcomer's first reads cost little more than the system call.
    min_read = 4096
    # A peer's read may cost this many times the cheapest's full read:
    # within it, timing noise never shrinks the reads of equal peers.
    slack = 1.5
    # Never less than this a read: a peer whose bytes cost nothing (an
    # unfinished event only copied) must not shrink everyone's reads to
    # system calls.  Never more than longest, alone or not: a peer that
    # connects waits for the read under way.  (A read of known templates
    # costs well under both: 64 KiB of JSON, 0.8 ms; 512 KiB raw, 0.3 ms.)
    least_quantum = 0.0002
    longest = 0.002
    # How much of its past a peer's cost keeps, read by read; and how
    # fast the cheapest cost may rise back when dearer peers read.
    decay = 0.75
    drift = 1.01

    def __init__(self, read_size: int) -> None:
        self.read_size = read_size
        self.per_byte = None  # the cheapest peer's seconds a byte

    def quantum(self) -> float:
        """Return how long a peer's read may take: the cheapest's full
        read, with slack."""
        if self.per_byte is None:
            return self.longest
        return min(self.longest, max(
            self.least_quantum, self.per_byte * self.read_size * self.slack))

    def size(self, conn: Connection, shared: bool) -> int:
        """Return how many bytes conn may read now; shared: other peers
        are connected."""
        if not conn.got:
            # Nothing known yet: start small where others may wait.
            return self.min_read if shared else self.read_size
        budget = self.quantum() if shared else self.longest
        return max(self.min_read, min(self.read_size, int(
            budget * conn.got / max(conn.spent, 1e-9))))

    def charge(self, conn: Connection, seconds: float, size: int,
               shared: bool) -> None:
        """Count a read of size bytes that cost seconds."""
        conn.spent = conn.spent * self.decay + seconds
        conn.got = conn.got * self.decay + size
        cost = conn.spent / conn.got
        if self.per_byte is None or cost < self.per_byte:
            self.per_byte = cost
        else:
            self.per_byte = min(cost, self.per_byte * self.drift)
        if shared:
            conn.debt = max(0.0, conn.debt + seconds - self.quantum())

    def sits_out(self, conn: Connection) -> bool:
        """Tell whether conn waits this round while others are served
        (it owes time); a round sat out pays a share of its debt."""
        if conn.debt <= 0.0:
            return False
        conn.debt = max(0.0, conn.debt - self.quantum())
        return True


def return_freed_memory() -> None:
    """Ask glibc to give the kernel back the free pages between live blocks."""
    trim = getattr(return_freed_memory, "trim", None)
    if trim is None:
        try:
            import ctypes
            trim = ctypes.CDLL(None).malloc_trim
        except (ImportError, OSError, AttributeError, TypeError):
            trim = bool  # not glibc: nothing to ask
        return_freed_memory.trim = trim
    trim(0)


class Reader:
    """Read from peers into the sink: whole events only, a long one in
    pieces, and the unfinished ones of every connection kept within
    --max-buffer-bytes."""

    def __init__(self, settings: Settings, sink: EventSink, console: Console,
                 connections: dict,
                 remove: Callable[[Connection, str], None]) -> None:
        self.sink = sink
        self.console = console
        self.connections = connections  # the listener's, by socket
        self.remove = remove  # remove(conn, why): the peer closed or reset
        self.max_event_bytes = settings.max_event_bytes
        self.budget = BufferBudget(settings.max_buffer_bytes)
        self.splits = Throttle(console.warn, SPLIT_LINES, REJECT_WINDOW,
                               say_splits)
        # One receive buffer for every connection: the loop reads one
        # connection at a time, and a buffer per peer would cost megabytes.
        self.read_size = JSON_RECV_SIZE if settings.format == "json" \
            else RECV_SIZE
        # A long event cut into tiny pieces (a small --max-event-bytes) is
        # an event per few bytes: smaller reads keep a round of the loop,
        # and so a stop, as quick as with events of a common size.
        self.read_size = min(self.read_size, max(
            JSON_RECV_SIZE, settings.max_event_bytes * 64))
        self.buffer = bytearray(settings.max_event_bytes + 1 + RECV_SIZE)
        self.bytes = 0
        self.share = FairShare(self.read_size)
        self.prefix = EventPrefix(settings.prefix) if settings.prefix \
            else None

    def receive(self, conn: Connection) -> bool:
        """Read once from conn, as much as its share allows; return True
        if the read came full and more may be waiting."""
        shared = len(self.connections) > 1
        read_size = self.share.size(conn, shared)
        started = time.perf_counter()
        splits = conn.framer.split_events
        received = conn.framer.received
        held = conn.held
        try:
            block = conn.read(self.buffer, read_size)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            # A reset peer ends its own connection, nobody else's.
            self.remove(conn, "reset by peer")
            return False
        if block is None:
            self.remove(conn, conn.retired_for)
            return False
        size = conn.framer.received - received
        self.bytes += size
        if conn.framer.split_events != splits:
            self.warn_split(conn)
        if block:
            self.emit(block, conn)
        if self.budget.change(conn.held - held):
            self.keep_within_budget()
        self.share.charge(conn, time.perf_counter() - started, size, shared)
        return size >= read_size and not self.sink.full()

    def finish(self, conn: Connection) -> None:
        """Write out conn's unfinished event: the peer is leaving."""
        splits = conn.framer.split_events
        self.budget.change(-conn.held)
        block = conn.framer.close()
        if conn.framer.split_events != splits:
            self.warn_split(conn)
        if block:
            self.emit(block, conn)

    def keep_within_budget(self) -> None:
        """Write out the largest unfinished events until the rest fit."""
        for conn, piece, first in self.budget.pieces(
                self.connections.values(), self.sink.full):
            if first:
                # Throttled as the other splits: peers holding events
                # past the budget, one after another, flood the log too.
                self.splits.say(
                    "budget", "event from %s split into pieces: unfinished "
                    "events held reached --max-buffer-bytes (%s)"
                    % (conn.where, format_bytes(self.budget.limit)))
            self.emit(piece, conn)

    def warn_split(self, conn: Connection) -> None:
        self.splits.say("split", "event from %s longer than %s, split into "
                        "pieces" % (conn.where,
                                    plural(self.max_event_bytes, "byte")))

    def emit(self, block: Block, conn: Connection) -> None:
        if self.prefix is not None:
            block = self.prefix.apply(block, conn.peer, conn.listen,
                                      time.time())
        conn.events += self.sink.emit(block, conn.peer, conn.framer.marks,
                                      conn.listen)


class Sweeper:
    """Keep places for the peers that use them: close connections past
    their time (--idle-timeout, --event-timeout), and when every place is
    taken and a peer waits, retire the connection silent longest."""

    def __init__(self, settings: Settings, connections: dict,
                 admission: Admission,
                 remove: Callable[[Connection, str], None],
                 quiet_seconds: float, longest_seconds: float,
                 retired_hold_places: bool) -> None:
        self.idle_timeout = settings.idle_timeout
        self.event_timeout = settings.event_timeout
        self.connections = connections  # the listener's, by socket
        self.admission = admission
        self.remove = remove  # remove(conn, why): close it, say why
        # A retired connection closes once silent quiet_seconds after our
        # FIN, or longest_seconds after it at most: as on a stop.
        self.quiet_seconds = quiet_seconds
        self.longest_seconds = longest_seconds
        # Where the selector watches only so many sockets (Windows'
        # select()), a retiring connection keeps its place until closed.
        self.retired_hold_places = retired_hold_places
        self.retiring = 0
        self.waiting_since = None  # since when a peer waits for a place
        self.next_sweep = 0.0

    def start(self, now: float) -> None:
        self.next_sweep = now + self.every()

    def due(self) -> float:
        """Return when fire() is next needed (it is a timer, as Stats)."""
        return self.next_sweep

    def every(self) -> float:
        """Return how often to look for connections past their time."""
        every = min(1.0, self.event_timeout / 4)
        if self.idle_timeout:
            every = min(every, self.idle_timeout / 4)
        if self.admission.paused or self.retiring:
            # A waiting peer may be given a place; a retiring connection
            # is closed once quiet.
            every = min(every, self.quiet_seconds)
        return every

    def fire(self, now: float) -> None:
        """Close connections past their time; make room for a waiting
        peer when all places are taken."""
        for conn in list(self.connections.values()):
            if conn.retired_at is not None:
                if now - conn.last_active >= self.quiet_seconds or \
                        now - conn.retired_at >= self.longest_seconds:
                    self.remove(conn, conn.retired_for)
                continue
            why = conn.overdue(now, self.idle_timeout, self.event_timeout)
            if why:
                self.remove(conn, why)
        if self.admission.peer_waiting():
            self.make_room(now)
        else:
            self.waiting_since = None
        self.next_sweep = now + self.every()

    def make_room(self, now: float) -> None:
        """Retire the connection silent longest: at once if silent
        EVICT_IDLE_SECONDS, else once a peer has waited that long."""
        if self.waiting_since is None:
            self.waiting_since = now
        serving = [conn for conn in self.connections.values()
                   if conn.retired_at is None]
        if not serving:
            return
        conn = min(serving, key=lambda c: c.last_active)
        silent = now - conn.last_active
        if silent >= EVICT_IDLE_SECONDS or \
                now - self.waiting_since >= EVICT_IDLE_SECONDS:
            self.waiting_since = None
            self.retire(conn, "silent for %s, its place given to a waiting "
                        "peer" % format_duration(silent))

    def retire(self, conn: Connection, why: str) -> None:
        """Give conn's place to another peer now, and close it once the
        peer heard our FIN and stopped: what it sent until then is read
        and written, as on a stop."""
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.remove(conn, why)
            return
        conn.retired_at = conn.last_active = time.monotonic()
        conn.retired_for = why
        self.retiring += 1
        self.next_sweep = min(self.next_sweep,
                              conn.retired_at + self.quiet_seconds)
        self.admission.resume()

    def left(self, conn: Connection) -> None:
        """Count conn gone."""
        if conn.retired_at is not None:
            self.retiring -= 1

    def taken_places(self) -> int:
        """Return how many places are taken."""
        if self.retired_hold_places:
            return len(self.connections)
        return len(self.connections) - self.retiring


def receive_buffer_granted() -> bool:
    """Tell whether the system lets a socket have RECV_BUFFER to receive."""
    # A fixed buffer turns the kernel's own sizing off: where a limit
    # (Linux's net.core.rmem_max) would cut it smaller, keep the kernel's.
    try:
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF,
                             RECV_BUFFER)
            return probe.getsockopt(socket.SOL_SOCKET,
                                    socket.SO_RCVBUF) >= RECV_BUFFER
    except OSError:
        return False


def claim_port(server: socket.socket) -> None:
    """Let a restarted listener bind at once, but no other program."""
    if os.name == "nt":
        # Windows' SO_REUSEADDR would let a second program take the port;
        # it never holds a port in TIME_WAIT against a new listener anyway.
        exclusive = getattr(socket, "SO_EXCLUSIVEADDRUSE", None)
        if exclusive is not None:
            server.setsockopt(socket.SOL_SOCKET, exclusive, 1)
    else:
        # A restarted listener must not wait for TIME_WAIT to expire.
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)


def open_server(listen: tuple, backlog: int) -> socket.socket:
    """Return a non-blocking socket listening at (host, port)."""
    host, port = listen
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UserError("cannot resolve %s: %s" % (host, exc.strerror))
    family, kind, proto, _, address = infos[0]
    server = socket.socket(family, kind, proto)
    try:
        claim_port(server)
        # Set before listen(): accepted sockets inherit it, and the
        # window scale they offer in the handshake follows from it.
        if receive_buffer_granted():
            server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF,
                              RECV_BUFFER)
        server.bind(address)
        server.listen(backlog)
    except OSError as exc:
        server.close()
        error = UserError("cannot listen on %s: %s" % (
            format_address(host, port), exc.strerror))
        error.errno = exc.errno  # what the lab check tells apart
        raise error
    server.setblocking(False)
    return server


def clear_stale_socket(path: str) -> None:
    """Remove a UNIX socket file at path that no program listens on; raise
    a UserError if one does, or if the file is no socket."""
    where = UNIX_PREFIX + path
    try:
        found = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise UserError("cannot listen on %s: %s" % (where, exc.strerror))
    if not stat.S_ISSOCK(found.st_mode):
        raise UserError("cannot listen on %s: the file there is not a "
                        "socket (remove it, or give another path)" % where)
    # As syslog-ng does before it binds: a socket file that refuses a
    # connection is what a listener killed without cleaning up left.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            pass
        except FileNotFoundError:
            return
        except socket.timeout:
            raise UserError("cannot listen on %s: another program listens "
                            "on it (its queue is full)" % where) from None
        except OSError as exc:
            raise UserError("cannot listen on %s: cannot tell whether "
                            "another program listens on it: %s"
                            % (where, exc.strerror)) from None
        else:
            raise UserError("cannot listen on %s: another program listens "
                            "on it" % where)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise UserError("cannot listen on %s: cannot remove the stale "
                        "socket file: %s" % (where, exc.strerror)) from None


def open_unix_server(path: str, backlog: int, mode: int) -> socket.socket:
    """Return a non-blocking UNIX stream socket listening at path, with
    permissions mode, a stale socket file there replaced."""
    where = UNIX_PREFIX + path
    clear_stale_socket(path)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bound = False
    try:
        server.bind(path)
        bound = True
        # Before listen(): until then no peer can connect, so none gets
        # in under the umask's permissions.
        os.chmod(path, mode)
        server.listen(backlog)
    except OSError as exc:
        server.close()
        if bound:
            os.unlink(path)
        raise UserError("cannot listen on %s: %s" % (
            where, exc.strerror or exc)) from None
    server.setblocking(False)
    return server


def peer_process(sock: socket.socket) -> Optional[int]:
    """Return the process id of a UNIX socket's peer, where the system
    tells (SO_PEERCRED on Linux, LOCAL_PEERPID on macOS), else None."""
    try:
        if hasattr(socket, "SO_PEERCRED"):
            size = struct.calcsize("3i")
            pid = struct.unpack("3i", sock.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, size))[0]
        elif sys.platform == "darwin":
            pid = sock.getsockopt(0, 2)  # SOL_LOCAL, LOCAL_PEERPID
        else:
            return None
    except OSError:
        return None
    return pid or None


class Place:
    """An address the listener listens at: its socket, its names, and the
    counts the summary gives for it.

    Each kind of place (TcpPlace, UnixPlace) opens its socket, accepts
    from it and names its peers; the loop serves them all alike.
    """

    takes_allow = True  # --allow's networks apply to its peers
    peer_names_place = False  # a peer's name holds the place's

    def __init__(self, address: tuple, label: str = "") -> None:
        self.address = address
        self.label = label
        self.server = None
        self.name = format_address(*address)  # as bound, once open
        self.accepted = self.rejected = 0
        self.events = 0  # of the connections closed so far

    @property
    def listen(self) -> str:
        """What events that arrive here are marked with: label or address."""
        return self.label or self.name

    @property
    def shown(self) -> str:
        """The place as lines name it: "alerts (0.0.0.0:9997)" or the
        address."""
        return "%s (%s)" % (self.label, self.name) if self.label \
            else self.name

    def open(self, backlog: int) -> None:
        """Listen, or raise a UserError that names the address."""
        raise NotImplementedError

    def accept(self) -> tuple:
        """Accept a peer: (socket, address), or raise OSError."""
        return self.server.accept()

    def peer_of(self, sock: socket.socket, address) -> tuple:
        """Return (peer, host) of a peer: how lines name it, and what
        --max-per-host counts it under."""
        raise NotImplementedError

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None


class TcpPlace(Place):
    """A TCP address: (host, port)."""

    def open(self, backlog: int) -> None:
        self.server = open_server(self.address, backlog)
        self.name = format_address(*self.server.getsockname()[:2])

    def peer_of(self, sock: socket.socket, address) -> tuple:
        return format_peer(address), peer_host(address[0])


class UnixPlace(Place):
    """A UNIX stream socket the listener listens at: made with mode,
    replacing a stale file, and removed when closed."""

    takes_allow = False  # its peers are local processes: the mode decides
    peer_names_place = True

    def __init__(self, address: UnixAddress, label: str = "",
                 mode: int = SOCKET_MODE) -> None:
        super().__init__(address, label)
        self.mode = mode
        self.identity = None  # the file's (device, inode), once bound

    def open(self, backlog: int) -> None:
        self.server = open_unix_server(self.address.path, backlog, self.mode)
        found = os.stat(self.address.path)
        self.identity = found.st_dev, found.st_ino

    def peer_of(self, sock: socket.socket, address) -> tuple:
        # A connecting UNIX socket rarely has a name of its own: the
        # process behind it is what tells peers apart.
        pid = peer_process(sock)
        peer = self.name if pid is None else "%s (pid %d)" % (self.name, pid)
        return peer, self.name

    def close(self) -> None:
        super().close()
        if self.identity is None:
            return
        try:
            # Only our own file: another listener may have replaced it.
            found = os.stat(self.address.path)
            if (found.st_dev, found.st_ino) == self.identity:
                os.unlink(self.address.path)
        except OSError:
            pass
        self.identity = None


class PipePlace(Place):
    """A Windows named pipe the listener serves (PipeServer): its clients
    come out of accept() as one end of a socket pair."""

    takes_allow = False  # remote clients: --remote-pipe-clients decides
    peer_names_place = True

    def __init__(self, address: tuple, label: str = "",
                 remote: bool = False) -> None:
        super().__init__(address, label)
        self.remote = remote

    def open(self, backlog: int) -> None:
        self.server = PipeServer(self.address[0], self.remote)
        self.name = self.server.name

    def peer_of(self, sock: socket.socket, address) -> tuple:
        # "\\.\pipe\NAME client N": every client is this computer's
        # (or a remote one let in): one host for --max-per-host.
        return format_peer(address), self.name


def listen_places(listen, socket_mode: int = SOCKET_MODE,
                  remote_pipe_clients: bool = False) -> list:
    """Return a place for each address of --listen (one address, as an
    embedder gives it, or a list of Listen)."""
    items = listen if isinstance(listen, list) else [listen]
    places = []
    for item in items:
        if not isinstance(item, Listen):
            item = Listen("", item)
        if isinstance(item.address, UnixAddress):
            places.append(UnixPlace(item.address, item.label, socket_mode))
        elif is_pipe(item.address):
            places.append(PipePlace(item.address, item.label,
                                    remote_pipe_clients))
        else:
            places.append(TcpPlace(item.address, item.label))
    return places


def announce(server: socket.socket, console: Console,
             label: str = "") -> str:
    """Say where server listens (as label, if one); return what to set in
    CyberTrace for it."""
    host, port = server.getsockname()[:2]
    where = format_address(host, port)
    named = where + (" as " + label if label else "")
    hosts = reachable_hosts(server)
    if hosts is None:
        console.status("Starting on " + named)
    elif hosts:
        shown = [format_address(h, port) for h in hosts[:6]]
        if len(hosts) > 6:
            shown.append("and %d more" % (len(hosts) - 6))
        console.status("Starting on %s (this host: %s)"
                       % (named, ", ".join(shown)))
        where = shown[0]
    else:
        console.status("Starting on %s (all interfaces)" % named)
        where = "this host's address:%d" % port
    return where


def unmatched_allow(server: socket.socket, allow: Optional[list]) -> list:
    """Return (network, never, why) for each --allow network that no peer
    of server can come from (never), or only a program on this host."""
    versions = peer_ip_versions(server)
    where = format_peer(server.getsockname())
    loopback = ip_of(server.getsockname()[0]).is_loopback
    local = None  # this host's addresses, asked once if needed
    found = []
    for network in allow or ():
        if network.version not in versions:
            found.append((network, True, "%s can never match: this socket "
                          "(%s) only takes IPv%d peers" % (
                              network, where, min(versions))))
        elif loopback and not network.overlaps(ipaddress.ip_network(
                "127.0.0.0/8" if network.version == 4 else "::1")):
            # A program here may connect to loopback from another of this
            # host's addresses: only a network holding none is never.
            if local is None:
                local = interface_addresses()
            if local and not any(ip in network for ip in local):
                found.append((network, True, "%s can never match: this "
                              "socket (%s) only takes peers on this host, "
                              "and none of this host's addresses is in it"
                              % (network, where)))
            else:
                found.append((network, False, "%s matches only programs on "
                              "this host: this socket (%s) takes no peer "
                              "from another host" % (network, where)))
    return found


def reachable_hosts(server: socket.socket) -> Optional[list]:
    """Return the addresses a wildcard-bound server can be reached at.

    None when it is bound to one address; [] when they cannot be found.
    """
    host = server.getsockname()[0]
    if not ip_of(host).is_unspecified:
        return None
    versions = peer_ip_versions(server)
    found = [ip for ip in interface_addresses() if ip.version in versions
             and not ip.is_link_local and not ip.is_unspecified]
    if not found:
        found = resolved_addresses()
        found = [ip for ip in found if ip.version in versions]
    # Loopback only serves a CyberTrace on this very host: list it last.
    found = sorted(set(found), key=lambda ip: (ip.is_loopback, ip.version,
                                               found.index(ip)))
    if any(not ip.is_loopback for ip in found):
        found = [ip for ip in found if not ip.is_loopback]
    return [str(ip) for ip in found]


def peer_ip_versions(server: socket.socket) -> set:
    """Return the IP versions of the peers server can accept."""
    if server.family != getattr(socket, "AF_INET6", None):
        return {4}
    ip = ip_of(server.getsockname()[0])
    if not ip.is_unspecified:
        return {6} if not ip.ipv4_mapped else {4}
    try:
        v6only = server.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
    except (OSError, AttributeError):
        v6only = 0
    # "::" takes IPv4 peers too, as ::ffff:a.b.c.d, unless IPV6_V6ONLY.
    return {6} if v6only else {4, 6}


# --- Windows named pipes -----------------------------------------------------
#
# CyberTrace's other ConnectionString form.  A pipe enters the loop as a
# socket does: PipeServer stands where a listening socket stands, and each
# client comes out of its accept() as one end of a socket pair, whose
# other end threads bridge to the client's pipe instance.  Framing, the
# formats, the output and the drain never learn where the bytes came from.

PIPE_PREFIXES = ("\\\\.\\pipe\\", "//./pipe/")
PIPE_NAME_MAX = 256  # the whole name, prefix included (CreateNamedPipe)
PIPE_BUFFER = 64 * 1024
# How often a bridge waiting on its pipe looks whether its socket closed.
PIPE_POLL_MS = 100
# Instances that wait for clients at any time: as many clients may
# connect in the same instant without one finding the pipe busy (16 let
# 32 raw clients at once find it busy).  62: with the stop event, all that
# one _winapi.WaitForMultipleObjects takes (63: it keeps one of Windows'
# 64 for Ctrl+C).
PIPE_SPARE_INSTANCES = 62
# Not in _winapi: winbase.h's values.
PIPE_REJECT_REMOTE_CLIENTS = 0x00000008
ERROR_FILE_NOT_FOUND = 2
ERROR_INVALID_NAME = 123
WAIT_TIMEOUT = 0x102


def parse_pipe(text: str) -> tuple:
    """Return (\\\\.\\pipe\\NAME, None), the address of a named pipe."""
    name = text[len(PIPE_PREFIXES[0]):]
    if not name:
        raise ValueError("a pipe needs a name: \\\\.\\pipe\\NAME")
    if "\\" in name or "/" in name or not name.isprintable():
        raise ValueError("a pipe's NAME has no \\, / or control characters")
    if len(PIPE_PREFIXES[0]) + len(name) > PIPE_NAME_MAX:
        raise ValueError("a pipe's name is at most %d characters long"
                         % PIPE_NAME_MAX)
    return PIPE_PREFIXES[0] + name, None


def is_pipe(address: tuple) -> bool:
    """Tell whether an address (from parse_address) is a named pipe."""
    return address[1] is None and isinstance(address[0], str) and \
        address[0].startswith(PIPE_PREFIXES)


def pipe_error(exc: OSError) -> str:
    """Return what a failed pipe call means, in words."""
    code = getattr(exc, "winerror", None)
    if code == ERROR_FILE_NOT_FOUND:
        return "no program serves this pipe"
    return exc.strerror or str(exc)


def wait_overlapped(ov, closed: Callable[[], bool]) -> bool:
    """Wait for an overlapped call; cancel it and return False once
    closed() says its other side is gone."""
    import _winapi
    while _winapi.WaitForSingleObject(ov.event, PIPE_POLL_MS) == WAIT_TIMEOUT:
        if closed():
            ov.cancel()
            return False
    return True


def pipe_to_socket(handle: int, sock: socket.socket,
                   closed: Callable[[], bool]) -> None:
    """Copy what the pipe gives into sock until either side ends; then
    say end of file to sock's peer."""
    import _winapi
    try:
        while True:
            ov, err = _winapi.ReadFile(handle, PIPE_BUFFER, overlapped=True)
            if err == _winapi.ERROR_IO_PENDING and \
                    not wait_overlapped(ov, closed):
                ov.GetOverlappedResult(True)
                return
            _, err = ov.GetOverlappedResult(True)
            if err == _winapi.ERROR_OPERATION_ABORTED:
                return
            data = ov.getbuffer()
            if data:
                sock.sendall(data)
    except OSError:
        return  # ERROR_BROKEN_PIPE: the other end closed; or sock did
    finally:
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def socket_to_pipe(handle: int, sock: socket.socket,
                   closed: Callable[[], bool], patient: bool = False) -> None:
    """Copy what sock gives into the pipe until either side ends; patient:
    a write the pipe's reader is slow to take is waited for even once
    closed() (what was sent before the end still arrives)."""
    import _winapi
    never = lambda: False  # noqa: E731
    while True:
        try:
            # Not a socket timeout: the other thread sends on sock.
            if not select.select([sock], [], [], PIPE_POLL_MS / 1000.0)[0]:
                if closed():
                    return
                continue
            data = sock.recv(PIPE_BUFFER)
        except (OSError, ValueError):
            return
        if not data:
            return
        try:
            while data:
                ov, err = _winapi.WriteFile(handle, data, overlapped=True)
                if err == _winapi.ERROR_IO_PENDING and not wait_overlapped(
                        ov, never if patient else closed):
                    ov.GetOverlappedResult(True)
                    return
                written, err = ov.GetOverlappedResult(True)
                if err == _winapi.ERROR_OPERATION_ABORTED:
                    return
                data = data[written:]
        except OSError:
            return  # the other end closed


def bridge_pipe(handle: int, name: str, keep_alive: bool = False,
                queued: Optional[Callable[[socket.socket], bool]] = None
                ) -> socket.socket:
    """Return a socket whose peer threads copy to and from the pipe
    instance handle (its own), closing the handle when both are done.

    keep_alive: what was sent reaches the pipe even after the socket is
    closed and the program's main thread returned (a sender's last
    events), as the kernel still delivers a closed TCP socket's.
    queued(socket): called before the copying starts; False: the socket
    is not wanted (closed, with the pipe)."""
    import _winapi
    ours, theirs = socket.socketpair()
    # A client's write returns once the copy took it: the socket must be
    # where a stopping listener's drain finds it before then.
    if queued is not None and not queued(ours):
        ours.close()
        theirs.close()
        _winapi.CloseHandle(handle)
        return ours
    ended = []
    lock = threading.Lock()

    def gone() -> bool:
        return ours.fileno() == -1

    def program_ended() -> bool:
        return gone() or not threading.main_thread().is_alive()

    def run(copy, *args) -> None:
        try:
            copy(handle, theirs, *args)
        finally:
            with lock:
                ended.append(copy)
                last = len(ended) == 2
            if last:
                _winapi.CloseHandle(handle)
                theirs.close()

    threading.Thread(target=run, args=(pipe_to_socket, gone), daemon=True,
                     name="pipe %s in" % name).start()
    threading.Thread(target=run, args=(socket_to_pipe, program_ended
                                       if keep_alive else gone, keep_alive),
                     daemon=not keep_alive, name="pipe %s out" % name).start()
    return ours


class PipeServer:
    """A Windows named pipe served as a listening socket is: accept()
    returns (socket, (name of the client, None)), fileno() is readable
    while a client waits to be taken.  PIPE_SPARE_INSTANCES instances
    always wait, and each taken is replaced before its client is served,
    so that clients coming together do not find the pipe busy."""

    def __init__(self, name: str, remote: bool = False,
                 blocking: bool = False) -> None:
        import _winapi
        self.name = name
        self.mode = _winapi.PIPE_WAIT | (0 if remote else
                                         PIPE_REJECT_REMOTE_CLIENTS)
        self.waiting = collections.deque()
        self.bell, self.ringer = socket.socketpair()
        self.bell.setblocking(blocking)
        self.clients = 0
        self.closed = False
        self.lock = threading.Lock()
        self.stopped = _winapi.CreateEventW(0, True, False, None)
        try:
            self.check_unserved()
            handle = self.create(first=True)
        except OSError as exc:
            self.close()
            why = "another program serves this pipe" if exc.winerror in (
                _winapi.ERROR_ACCESS_DENIED, _winapi.ERROR_PIPE_BUSY) \
                else "not a valid pipe name" if exc.winerror == \
                ERROR_INVALID_NAME else pipe_error(exc)
            error = UserError("cannot listen on %s: %s" % (name, why))
            error.errno = errno.EADDRINUSE if "another" in why else None
            raise error from None
        self.thread = threading.Thread(target=self.serve, args=(handle,),
                                       daemon=True, name="pipe " + name)
        self.thread.start()

    def check_unserved(self) -> None:
        """Raise ERROR_PIPE_BUSY if another program serves the name."""
        import _winapi
        # FILE_FLAG_FIRST_PIPE_INSTANCE is the guard; this says it where
        # that flag is not honoured (wine).
        try:
            _winapi.WaitNamedPipe(self.name, 1)
        except OSError as exc:
            if exc.winerror == ERROR_FILE_NOT_FOUND:
                return
        raise OSError(errno.EADDRINUSE, "in use", None,
                      _winapi.ERROR_PIPE_BUSY)

    def create(self, first: bool = False) -> int:
        """Make a pipe instance for a client to connect to."""
        import _winapi
        flags = _winapi.PIPE_ACCESS_DUPLEX | _winapi.FILE_FLAG_OVERLAPPED
        if first:  # the name must be ours, not another program's
            flags |= _winapi.FILE_FLAG_FIRST_PIPE_INSTANCE
        return _winapi.CreateNamedPipe(
            self.name, flags, self.mode, _winapi.PIPE_UNLIMITED_INSTANCES,
            PIPE_BUFFER, PIPE_BUFFER, 0, _winapi.NULL)

    def serve(self, first: int) -> None:
        """Keep PIPE_SPARE_INSTANCES instances waiting for clients; hand
        each client over to the loop once its instance is replaced."""
        import _winapi
        waiting = []  # (handle, overlapped ConnectNamedPipe)
        self.listen(first, waiting)
        try:
            while not self.closed:
                self.replenish(waiting)
                events = [ov.event for _, ov in waiting] + [self.stopped]
                # Short of instances (out of resources): try again soon.
                which = _winapi.WaitForMultipleObjects(
                    events, False, _winapi.INFINITE if len(waiting) >=
                    PIPE_SPARE_INSTANCES else PIPE_POLL_MS)
                if which == len(events) - 1 or self.closed:
                    return
                connected = [(handle, ov) for handle, ov in waiting
                             if _winapi.WaitForSingleObject(ov.event, 0) ==
                             _winapi.WAIT_OBJECT_0]
                for instance in connected:
                    waiting.remove(instance)
                # Replaced before served: a client arriving meanwhile
                # finds an instance free, never ERROR_PIPE_BUSY.
                self.replenish(waiting)
                for handle, ov in connected:
                    try:
                        _, err = ov.GetOverlappedResult(True)
                    except OSError:
                        err = -1
                    if err == 0:
                        # A socket pair takes a while on Windows (a TCP
                        # connection): not in the way of the next client.
                        threading.Thread(target=self.hand_over,
                                         args=(handle,), daemon=True).start()
                    else:
                        _winapi.CloseHandle(handle)
        finally:
            for handle, ov in waiting:
                ov.cancel()
                try:
                    ov.GetOverlappedResult(True)
                except OSError:
                    pass
                _winapi.CloseHandle(handle)

    def replenish(self, waiting: list) -> None:
        """Make instances until PIPE_SPARE_INSTANCES wait, or no more can
        be made now."""
        while len(waiting) < PIPE_SPARE_INSTANCES and not self.closed:
            try:
                handle = self.create()
            except OSError:
                return
            self.listen(handle, waiting)

    def listen(self, handle: int, waiting: list) -> None:
        """Wait for a client on a new instance (in waiting)."""
        import _winapi
        try:
            ov = _winapi.ConnectNamedPipe(handle, overlapped=True)
        except OSError as exc:
            # A client that connected, wrote and left before we asked: what
            # it wrote is still to be read.
            if exc.winerror == _winapi.ERROR_NO_DATA:
                self.hand_over(handle)
            else:
                _winapi.CloseHandle(handle)
            return
        waiting.append((handle, ov))

    def hand_over(self, handle: int) -> None:
        """Queue a connected client for accept()."""
        with self.lock:
            self.clients += 1
            client = "%s client %d" % (self.name, self.clients)
        def queue(sock: socket.socket) -> bool:
            with self.lock:
                if self.closed:
                    return False
                self.waiting.append((sock, (client, None)))
            try:
                self.ringer.send(b"\0")
            except OSError:
                pass
            return True

        try:
            bridge_pipe(handle, client, queued=queue)
        except OSError:  # out of sockets: the client finds the pipe closed
            import _winapi
            _winapi.CloseHandle(handle)

    def fileno(self) -> int:
        return self.bell.fileno()

    def getsockname(self) -> tuple:
        return self.name, None

    def setblocking(self, flag: bool) -> None:
        self.bell.setblocking(flag)

    def accept(self) -> tuple:
        """Return (socket, (client, None)) of the next client; without
        one, BlockingIOError (non-blocking) or wait for one."""
        if not self.bell.recv(1):
            raise OSError(errno.EBADF, "pipe server closed")
        sock, address = self.waiting.popleft()
        sock.setblocking(True)
        return sock, address

    def shutdown(self, how: int = socket.SHUT_RDWR) -> None:
        """Wake a thread blocked in accept()."""
        try:
            self.ringer.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        """Take no more clients; close those never taken."""
        import _winapi
        if self.closed:
            return
        self.closed = True
        _winapi.SetEvent(self.stopped)
        thread = getattr(self, "thread", None)
        if thread is not None:
            thread.join(5)
        with self.lock:
            while self.waiting:
                self.waiting.popleft()[0].close()
        self.bell.close()
        self.ringer.close()
        _winapi.CloseHandle(self.stopped)


def connect_pipe(name: str, timeout: Optional[float] = None,
                 keep_alive: bool = True) -> socket.socket:
    """Connect to a named pipe as a client; return a socket bridged to it.

    Raises OSError as socket.create_connection does: ConnectionRefusedError
    when no program serves the pipe, socket.timeout when every instance
    stayed busy for timeout seconds."""
    import _winapi
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            handle = _winapi.CreateFile(
                name, _winapi.GENERIC_READ | _winapi.GENERIC_WRITE, 0,
                _winapi.NULL, _winapi.OPEN_EXISTING,
                _winapi.FILE_FLAG_OVERLAPPED, _winapi.NULL)
            break
        except OSError as exc:
            if exc.winerror == ERROR_FILE_NOT_FOUND:
                raise ConnectionRefusedError(errno.ECONNREFUSED,
                                             pipe_error(exc)) from None
            if exc.winerror != _winapi.ERROR_PIPE_BUSY:
                raise OSError(exc.errno, pipe_error(exc)) from None
        # Every instance busy: wait for one, as a pipe client should.
        left = 1000 if deadline is None else \
            int((deadline - time.monotonic()) * 1000)
        if left <= 0:
            raise socket.timeout("every instance of the pipe stayed busy")
        try:
            _winapi.WaitNamedPipe(name, min(left, 1000))
        except OSError:
            pass  # timed out, or gone: CreateFile says which
    sock = bridge_pipe(handle, name, keep_alive)
    sock.settimeout(timeout)
    return sock


# --- The listener ------------------------------------------------------------

class Listener:
    """Accept any number of peers and write their events, never interleaved.

    One selectors loop serves every peer; each registered socket carries
    the function that handles it.  Timers (--timeout, the sweep of
    connections past their time, the counters) ride on the loop's
    wake-ups; signals arrive on a socket.  While the output is a pipe that
    takes nothing, the loop waits on a second selector that holds only the
    pipe and the signals: peers wait in their sockets, and Ctrl+C or
    SIGTERM still stops it.
    """

    drain_seconds = DRAIN_SECONDS
    drain_quiet_seconds = DRAIN_QUIET_SECONDS
    # An --allow that no peer can match would refuse every peer for ever:
    # a slip in the arguments (an embedder may know better).
    allow_must_match = True

    def __init__(self, settings: Settings, output,
                 console: Optional[Console] = None) -> None:
        self.settings = settings
        self.output = output
        self.console = console or Console(settings.quiet)
        self.selector = selectors.DefaultSelector()
        self.stall_selector = selectors.DefaultSelector()
        self.connections = {}
        self.sink = EventSink(settings, output, self.console)
        self.places = listen_places(settings.listen, settings.socket_mode,
                                    settings.remote_pipe_clients)
        self.admission = Admission(settings, self.console, self.selector)
        self.reader = Reader(settings, self.sink, self.console,
                             self.connections, self.remove)
        self.sweeper = Sweeper(
            settings, self.connections, self.admission, self.remove,
            self.drain_quiet_seconds, self.drain_seconds,
            retired_hold_places=selector_capacity(self.selector) is not None)
        self.stats = Stats(self.counters, self.console, settings.stats)
        # What was never written, the output having failed: unfinished
        # events, and bytes the kernel had acknowledged, never read.
        self.abandoned = self.unread = 0
        self.stop_asked = False
        # How many sockets this round of the loop found ready: a peer that
        # owes time sits out only while another waits.
        self.ready = 0
        self.draining = False
        self.stop_now = False
        self.hung_up = False  # SIGHUP with events going to a terminal
        # A copy of the fd of the pipe events go to, watched (see
        # watch_output), and the output's fd it is a copy of.
        self.watched = self.watched_of = None
        self.reopen_requested = False
        self.comings = Throttle(self.console.status, CONNECTION_LINES,
                                REJECT_WINDOW, say_connections)
        self.throttles = (self.admission.refusals, self.comings,
                          self.reader.splits)
        # What the loop fires when due: each has due() and fire(now).
        self.timers = (self.sweeper, self.stats, self.admission,
                       *self.throttles)

    @property
    def stopping(self) -> bool:
        """Tell whether to stop serving: asked to, or --count is met."""
        return self.stop_asked or self.sink.full()

    def address(self) -> tuple:
        """Return (host, port) where it listens (the first address), once
        bound."""
        return self.admission.server.getsockname()[:2]

    def counters(self) -> tuple:
        """Return (events written, bytes received, open connections)."""
        return self.sink.events, self.reader.bytes, len(self.connections)

    def watch_signals(self, reader: socket.socket) -> None:
        """Act on the signal numbers that arrive on reader."""
        take = functools.partial(self.take_signals, reader)
        self.selector.register(reader, selectors.EVENT_READ, take)
        self.stall_selector.register(reader, selectors.EVENT_READ, take)

    def bind(self) -> None:
        """Listen where the settings say, at every address or none, and
        say where that is."""
        self.admission.open(self.places, self.accept)
        allow = self.settings.allow
        tcp = [place for place in self.places if place.takes_allow]
        unmatched = [unmatched_allow(place.server, allow) for place in tcp]
        if self.allow_must_match:
            self.refuse_impossible_allow(unmatched)
        for found in unmatched:
            for _, _, why in found:
                self.console.warn("--allow " + why)
        if allow and len(tcp) < len(self.places):
            self.console.warn("--allow does not apply to UNIX sockets: "
                              "their peers are local processes, let in by "
                              "the socket's permissions (--socket-mode)")
        wheres = [self.announce(place) for place in self.places]
        # CyberTrace's outputs take an address or a pipe: a UNIX socket
        # is for programs on this host (a relay, the stand-in).
        remote = [where for place, where in zip(self.places, wheres)
                  if not isinstance(place, UnixPlace)]
        local = [where for where in wheres if where not in remote]
        if remote:
            line = "Waiting for CyberTrace (OutputSettings > " \
                "ConnectionString = %s)" % ", ".join(remote)
            if local:
                line += ", and programs here at %s" % ", ".join(local)
        else:
            line = "Waiting for programs here at %s (CyberTrace's outputs " \
                "take ADDR:PORT or a pipe, not a UNIX socket)" % ", ".join(
                    local)
        self.console.status(line + "; Ctrl+C to stop")

    def refuse_impossible_allow(self, unmatched: list) -> None:
        """Raise an ArgumentError for an --allow that would refuse every
        peer for ever: a network that no address can match, or an address
        that no network can (unmatched: unmatched_allow() of each)."""
        allow = self.settings.allow or []
        for network in allow:
            whys = [why for found in unmatched for net, never, why in found
                    if net == network and never]
            if whys and len(whys) == len(unmatched):
                raise ArgumentError("argument --allow: " + whys[0])
        for found in unmatched:
            whys = [why for _, never, why in found if never]
            if allow and len(whys) == len(allow):
                raise ArgumentError("argument --allow: " + "; ".join(whys))

    def announce(self, place: Place) -> str:
        """Say where place listens; return what to set in CyberTrace."""
        named = " as " + place.label if place.label else ""
        if isinstance(place, UnixPlace):
            self.console.status("Starting on %s%s (mode %04o)" % (
                place.name, named, place.mode))
            where = place.name
        elif isinstance(place, PipePlace):
            self.console.status("Starting on %s%s (a named pipe; %s)" % (
                place.name, named, "clients on other computers too"
                if place.remote else "clients on this computer only"))
            where = place.name
        else:
            where = announce(place.server, self.console,
                             place.label)
        return where

    def serve(self) -> int:
        """Serve until stopped; write out what was received; return the
        exit status (raise OutputFailed if events could not be written)."""
        timeout = self.settings.timeout
        started = time.monotonic()
        deadline = started + timeout if timeout else None
        self.sweeper.start(started)
        timed_out = False
        while not self.stopping:
            self.watch_output()
            now = time.monotonic()
            due = [t for t in (deadline, *(timer.due() for timer in
                                           self.timers)) if t is not None]
            wait = min(max(0.0, min(due) - now), LONGEST_WAIT)
            if self.output.stalled():
                self.wait_for_output(now + wait)
            ready = self.selector.select(
                0 if self.output.stalled() else wait)
            self.ready = len(ready)
            for key, _ in ready:
                key.data()
                if self.stopping:
                    break
            self.ready = 0
            self.run_timers(time.monotonic())
            if deadline is not None and time.monotonic() >= deadline:
                self.stop_asked = timed_out = True
        self.drain()
        for throttle in self.throttles:
            throttle.flush()
        count = self.settings.count
        if timed_out and count and not self.sink.full():
            self.console.warn("timeout: received %s of %s" % (
                format_count(self.sink.events), plural(count, "event")))
            return 1
        return 0

    def run_timers(self, now: float) -> None:
        """Do what is due: a reopen asked for (SIGHUP), then the timers
        (the sweep, the counters, the lines not shown one by one)."""
        if self.reopen_requested:
            self.reopen_requested = False
            self.sink.reopen()
        for timer in self.timers:
            due = timer.due()
            if due is not None and now >= due:
                timer.fire(now)

    def accept(self, place: Place) -> None:
        """Take the peers waiting to connect at place, as many as may be
        served."""
        while not self.admission.full(self.sweeper.taken_places()):
            if not self.accept_one(place):
                return
        self.admission.pause(self.sweeper.taken_places())

    def accept_one(self, place: Place) -> bool:
        """Serve the next peer in place's accept queue; False when empty."""
        taken = self.admission.take(self.sweeper.taken_places(), place)
        if taken is None:
            return False
        sock, address = taken
        conn = Connection(sock, address, self.settings.max_event_bytes,
                          place, len(self.places) > 1)
        self.connections[sock] = conn
        self.admission.joined(conn)
        self.selector.register(sock, selectors.EVENT_READ,
                               functools.partial(self.serve_peer, conn))
        self.comings.say("opened", "Connection from " + conn.where)
        return True

    def serve_peer(self, conn: Connection) -> None:
        """Receive from conn; a bug it triggers costs only that peer."""
        if conn.sock not in self.connections or self.output.stalled():
            return  # closed earlier in this round, or nowhere to write
        try:
            self.take_turn(conn)
        except UserError:
            raise
        except Exception as exc:  # a last line of defence, not flow control
            self.console.warn("dropping %s after an internal error: %r"
                              % (conn.where, exc))
            if conn.sock in self.connections:
                self.forget(conn)

    def take_turn(self, conn: Connection) -> None:
        """Read from conn while its reads fill the buffer and none waits;
        not at all this round if it owes time and others wait."""
        if self.ready > 1:
            if self.reader.share.sits_out(conn):
                return
        else:
            conn.debt = 0.0  # nobody waited for it
        for _ in range(READS_PER_TURN):
            if not self.reader.receive(conn) or self.others_waiting(conn):
                return

    def others_waiting(self, conn: Connection) -> bool:
        """Tell whether another peer, a new one or a signal is waiting."""
        # Asking costs a system call and a list of every ready peer: with
        # other peers connected, let the next round find out.
        if len(self.connections) > 1 or self.output.stalled():
            return True
        return any(key.fileobj is not conn.sock
                   for key, _ in self.selector.select(0))

    def remove(self, conn: Connection, why: str = "") -> None:
        """Close conn, writing out its unfinished event first."""
        self.reader.finish(conn)
        self.forget(conn)
        self.comings.say("closed", "Closed %s%s: %s" % (
            conn.where, " (%s)" % why if why else "",
            plural(conn.events, "event")))

    def forget(self, conn: Connection) -> None:
        """Close conn's socket and give its place to the next peer."""
        self.sweeper.left(conn)
        self.selector.unregister(conn.sock)
        del self.connections[conn.sock]
        conn.place.events += conn.events
        self.admission.left(conn)
        conn.sock.close()
        if not self.stopping:
            self.admission.resume()

    def take_signals(self, wakeup: socket.socket) -> None:
        try:
            signals = wakeup.recv(512)
        except OSError:
            return
        for number in signals:
            if number == getattr(signal, "SIGHUP", None) and \
                    not (self.output.terminal and not self.settings.output):
                self.reopen_requested = True
            elif number == getattr(signal, "SIGUSR1", None):
                self.stats.print_line()  # as dd does
            elif number == getattr(signal, "SIGHUP", None):
                # The terminal we write to hung up: no one to write out to.
                self.stop_asked = self.stop_now = self.hung_up = True
            elif self.draining:
                self.stop_now = True  # asked to stop again: now
            else:
                self.stop_asked = True

    def wait_for_output(self, deadline: float) -> bool:
        """Wait until a stalled pipe took what waits, or the deadline;
        tell whether it did."""
        output = self.output
        while output.stalled() and not self.stop_now and \
                (self.draining or not self.stopping):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            # An event that waits for room in a pipe looks for it now and
            # then: select() says a pipe is writable at every page freed.
            polling = output.room_wanted is not None
            if polling:
                left = min(left, ROOM_POLL_SECONDS)
            else:
                self.stall_selector.register(
                    output.fd, selectors.EVENT_WRITE, self.sink.flush)
            try:
                keys = self.stall_selector.select(left)
            finally:
                if not polling:
                    self.stall_selector.unregister(output.fd)
            for key, _ in keys:
                key.data()
            if polling:
                self.sink.flush()
        return not output.stalled()

    def watch_output(self) -> None:
        """Watch the pipe events go to for its reader going away, so that
        the listener ends at once (| head), not at its next write."""
        fd = self.output.watched_pipe()
        if fd == self.watched_of:
            return  # a reopen gives a new number: the old is still open
        self.unwatch_output()
        self.watched_of = fd
        if fd is not None:
            # A copy of the fd: a reopen (SIGHUP) closes the original,
            # whose number a new peer's socket may then take.
            self.watched = os.dup(fd)
            self.selector.register(self.watched, selectors.EVENT_READ,
                                   self.output.check_reader)

    def unwatch_output(self) -> None:
        if self.watched is not None:
            self.selector.unregister(self.watched)
            os.close(self.watched)
            self.watched = self.watched_of = None

    def drain(self) -> None:
        """Write out what the kernel already accepted for us, then close."""
        self.draining = True
        deadline = time.monotonic() + self.drain_seconds
        # Peers in the accept queue completed their handshake and what they
        # sent was acknowledged: it counts as delivered, so take it too.
        for place in self.admission.places:
            while not self.sink.full() and time.monotonic() < deadline \
                    and not self.stop_now:
                if not self.accept_one(place):
                    break
        self.admission.close()
        self.read_until_peers_stop(deadline)
        if not self.output.stalled():  # else abandon() counts what waits
            for conn in list(self.connections.values()):
                self.remove(conn)
        if not self.wait_for_output(deadline):
            raise OutputFailed("gave up writing to %s: nothing read it for "
                               "%s" % (self.output.name, format_duration(
                                   self.drain_seconds)))

    def read_until_peers_stop(self, deadline: float) -> None:
        """Tell each peer we are closing, and read what they send until
        they stop, or the deadline."""
        # Bytes that reach a socket before close() are acknowledged to the
        # sender, and close() throws away those still unread: so say we
        # are closing (FIN) and read on until each peer closes its side,
        # as a sender that resends does at once (--reconnect), or falls
        # silent for a moment, or the deadline comes.
        now = time.monotonic()
        for conn in self.connections.values():
            conn.last_active = now
            try:
                conn.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        quiet_for = self.drain_quiet_seconds
        while self.connections and not self.sink.full() and \
                self.wait_for_output(deadline):
            now = time.monotonic()
            for conn in list(self.connections.values()):
                if now - conn.last_active >= quiet_for:
                    self.remove(conn)
            quiet = [conn.last_active + quiet_for
                     for conn in self.connections.values()]
            if not quiet or now >= deadline or self.stop_now:
                break
            for key, _ in self.selector.select(min(quiet + [deadline]) - now):
                key.data()

    def abandon(self) -> None:
        """Count what no one will write (the output failed): unfinished
        events, and bytes that peers sent and we never read; close their
        connections."""
        for conn in list(self.connections.values()):
            if conn.held:
                self.abandoned += 1
            self.unread += unread_count(conn.sock.fileno()) or 0
            self.forget(conn)

    def close(self) -> None:
        self.admission.close()
        for place in self.places:
            place.close()  # one that failed to open left nothing
        self.unwatch_output()
        for conn in list(self.connections.values()):
            self.selector.unregister(conn.sock)
            conn.sock.close()
        self.connections.clear()
        self.selector.close()
        self.stall_selector.close()

    def summary(self) -> str:
        """Say what was written, and what came in that was not."""
        unwritten = self.sink.not_written() + self.abandoned
        lost = []
        if unwritten:
            lost.append("%s more received, not written"
                        % format_count(unwritten))
        if self.output.unread_lost:
            # Written into a pipe, and gone with its reader: the kernel held
            # them, unread, when it closed.
            lost.append("%s of them (%s) left unread in the pipe by its "
                        "reader" % (format_count(self.output.events_lost),
                                    format_bytes(self.output.unread_lost)))
        if self.unread:
            lost.append("%s more sent by peers, never read"
                        % format_bytes(self.unread))
        extra = " (%s)" % "; ".join(lost) if lost else ""
        line = "Stopped: %s%s, %s received, %s, %s rejected" % (
            plural(self.sink.written(), "event"), extra,
            format_bytes(self.reader.bytes),
            plural(self.admission.accepted, "connection"),
            format_count(self.admission.rejected))
        if len(self.places) > 1:
            line += "".join("\n  %s" % self.place_summary(place)
                            for place in self.places)
        return line

    def place_summary(self, place: Place) -> str:
        """Say what came at one of several places."""
        events = place.events + sum(conn.events for conn in
                                    self.connections.values()
                                    if conn.place is place)
        return "%s: %s, %s, %s rejected" % (
            place.shown, plural(events, "event"),
            plural(place.accepted, "connection"),
            format_count(place.rejected))


class ListenerConsole(Console):
    """The console of a listener run from the command line."""

    # Its loop serves the signals: a line that stderr cannot take now is
    # dropped rather than waited for.
    never_block = True


class OwnedListener(Listener):
    """The listener of an EmbeddedListener."""

    # Its owner stops it once it has what it waited for: a moment's quiet
    # then tells that nothing more is on its way.
    drain_seconds = 0.5
    drain_quiet_seconds = 0.05
    # The check allows CyberTrace's host by every address it has, of
    # both families, whatever it listens on.
    allow_must_match = False


def readable_now(sock: socket.socket) -> bool:
    """Tell whether a socket has something to read (a peer to accept)."""
    try:
        return bool(select.select([sock], [], [], 0)[0])
    except (OSError, ValueError):
        return False


def signal_numbers(names: tuple = LOOP_SIGNALS) -> list:
    """Return the numbers of the named signals this platform has."""
    return [getattr(signal, name) for name in names if hasattr(signal, name)]


def install_signals(listener: Listener) -> tuple:
    """Route the LOOP_SIGNALS this platform has into the selector loop."""
    reader, writer = socket.socketpair()
    reader.setblocking(False)
    writer.setblocking(False)
    listener.watch_signals(reader)
    signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    # The handlers only need to exist: the wakeup fd carries the signal
    # number into the loop, where it is acted on between two batches.
    for number in signal_numbers():
        signal.signal(number, lambda *_: None)
    return reader, writer


def restore_signals(pair: tuple) -> None:
    signal.set_wakeup_fd(-1)
    hangup = getattr(signal, "SIGHUP", None)
    for number in signal_numbers():
        if number == hangup:
            # The listener is past its summary: a terminal's hang-up that
            # comes now (the shell sends one as the terminal goes) must not
            # turn a clean exit into death by signal.
            signal.signal(number, signal.SIG_IGN)
            continue
        signal.signal(number, signal.SIG_DFL if number != signal.SIGINT
                      else signal.default_int_handler)
    for sock in pair:
        sock.close()


def check_listen(parser: argparse.ArgumentParser,
                 args: argparse.Namespace) -> None:
    """Give -l its default; exit 2 on an address or label given twice."""
    args.listen = args.listen or [Listen("", (LISTEN_ADDR, LISTEN_PORT))]
    labels, addresses = set(), set()
    for label, address in args.listen:
        if label and label in labels:
            parser.error("argument -l/--listen: label %s given twice"
                         % label)
        if address in addresses and address[1] != 0:
            parser.error("argument -l/--listen: %s given twice"
                         % format_address(*address))
        labels.add(label)
        addresses.add(address)


def refuse_unused(parser: argparse.ArgumentParser,
                  args: argparse.Namespace) -> None:
    """Exit 2 on an option that would do nothing here, as the sender does
    (a slip: a -o forgotten, a unix: meant); else give it its default."""
    unix = any(isinstance(address, UnixAddress) for _, address in args.listen)
    pipe = any(is_pipe(address) for _, address in args.listen)
    for given, name, needed, what in (
            (args.file_mode is not None, "--file-mode", args.output,
             "-o/--output FILE"),
            (args.socket_mode is not None, "--socket-mode", unix,
             "-l unix:/PATH"),
            (args.remote_pipe_clients, "--remote-pipe-clients", pipe,
             "-l \\\\.\\pipe\\NAME"),
            (args.per_host_prefix is not None, "--per-host-prefix",
             args.max_per_host, "--max-per-host N")):
        if given and not needed:
            parser.error("argument %s: only with %s" % (name, what))
    for name, default in (("file_mode", FILE_MODE),
                          ("socket_mode", SOCKET_MODE),
                          ("per_host_prefix", PER_HOST_PREFIX)):
        if getattr(args, name) is None:
            setattr(args, name, default)


def main(argv: Optional[list] = None) -> int:
    """Run the listener; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_listen(parser, args)
    refuse_unused(parser, args)
    settings = Settings.from_arguments(args)
    if settings.prefix and settings.format == "json":
        parser.error("argument --prefix: not with -f json: its lines have "
                     "\"time\", \"peer\" and \"listen\" members (-f raw or "
                     "text takes "
                     "--prefix)")
    prog = parser.prog
    try:
        output = Output(settings.output, 2 if settings.format == "text"
                        else 1, settings.file_mode)
    except UserError as exc:
        print("%s: error: %s" % (prog, exc), file=sys.stderr)
        return 1
    keep_freed_memory()
    console = ListenerConsole.for_stderr(settings.quiet)
    listener = Listener(settings, output, console)
    pair = install_signals(listener)
    try:
        listener.bind()
        status = listener.serve()
    except OutputFailed as exc:
        # What was lost is said even with -q: the summary counts it.
        listener.abandon()
        # No more events will come to finish the one half-written.
        if console.gate is not None:
            console.release(end_line=output.mid_event())
            console.gate = None
        console.line(listener.summary())
        console.line("%s: error: %s" % (prog, exc))
        if not settings.output:
            silence_stdout()
        # A terminal that hung up ends the listener normally, whether
        # events were on their way to it or not; what they were is counted.
        status = 0 if listener.hung_up or exc.hung_up else 1
    except UserError as exc:
        console.line("%s: error: %s" % (prog, exc))
        status = 2 if isinstance(exc, ArgumentError) else 1
    else:
        console.status(listener.summary())
    finally:
        listener.close()
        restore_signals(pair)
        output.close()
    return status


if __name__ == "__main__":
    sys.exit(main())
