"""The listener under load: fair turns between peers, bounded memory."""

from __future__ import annotations

import os
import tempfile
import threading
import time
import unittest
from collections import Counter

from support import TIMEOUT, Listener

import listen_events_cybertrace as lec

# Events with many fields: JSON formats them far slower than loopback
# carries them, so a flooding peer always has a full buffer waiting.
FLOOD_EVENT = b" ".join(b"f%d=%d" % (i, i) for i in range(16)) + b"\n"
FLOOD_BYTES = 32 * 1024 * 1024


class FileWatch:
    """Find a byte string in a file that grows, reading each byte once."""

    def __init__(self, path: str, needle: bytes) -> None:
        self.path = path
        self.needle = needle
        self.offset = 0
        self.tail = b""

    def found(self) -> bool:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        self.offset += len(data)
        window = self.tail + data
        self.tail = window[-len(self.needle):]
        return self.needle in window


class FairnessTest(unittest.TestCase):
    def test_a_flooding_peer_does_not_hold_up_another_peers_event(self):
        with tempfile.TemporaryDirectory() as tmp:
            out_path = os.path.join(tmp, "out")
            with Listener("-f", "json", "-o", out_path) as listener:
                stop = threading.Event()
                flood = {"sent": 0, "finished": False}

                def send_flood():
                    chunk = FLOOD_EVENT * (1024 * 1024 // len(FLOOD_EVENT))
                    try:
                        with listener.connect() as sock:
                            while not stop.is_set() and \
                                    flood["sent"] < FLOOD_BYTES:
                                sock.sendall(chunk)
                                flood["sent"] += len(chunk)
                            flood["finished"] = not stop.is_set()
                    except OSError:
                        pass
                thread = threading.Thread(target=send_flood)
                thread.start()
                try:
                    # The flood is under way once its events reach the file.
                    listener.wait_for(lambda: os.path.exists(out_path) and
                                      os.path.getsize(out_path) > 1 << 20,
                                      what="the flood's events in the file")
                    watch = FileWatch(out_path, b'"event":"single=event"')
                    sent = time.monotonic()
                    listener.send(b"single=event\n")
                    listener.wait_for(watch.found, what="the single event")
                    took = time.monotonic() - sent
                    finished = flood["finished"]
                    sent_bytes = flood["sent"]
                finally:
                    stop.set()
                    thread.join(TIMEOUT)
                # Starved, the event would come only after the flood's last
                # bytes; the delay itself is the benchmark's to report.
                self.assertFalse(finished, "the single event came %.3f s "
                                 "after it was sent, once the flood of %d "
                                 "bytes was over" % (took, sent_bytes))
                self.assertEqual(listener.stop(), 0)


class ReleaseTest(unittest.TestCase):
    def test_release_gives_up_a_piece_and_keeps_the_event_going(self):
        framer = lec.EventFramer()
        self.assertEqual(bytes(framer.feed(b"abc\r")), b"")
        self.assertEqual(framer.release(), b"ab\n")
        self.assertEqual(bytes(framer.feed(b"\nnext\nxyz")), b"c\nnext\n")
        self.assertEqual(framer.release(), b"xy\n")
        self.assertEqual(framer.release(), b"")  # one byte stays
        self.assertEqual(bytes(framer.feed(b"\n")), b"z\n")
        self.assertEqual(framer.split_events, 2)


def memory_kib(pid: int, field: str) -> int:
    """Return a process's VmRSS or VmHWM (its peak) in KiB, from /proc."""
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError("no %s in /proc/%d/status" % (field, pid))


def unread_bytes(port: int) -> int:
    """Return the bytes that sockets on port hold unread or unacknowledged."""
    total = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            rows = f.read().splitlines()[1:]
        for row in rows:
            fields = row.split()
            local, remote = (int(a.rsplit(":", 1)[1], 16)
                             for a in fields[1:3])
            if port in (local, remote) and fields[3] == "01":
                tx, rx = (int(n, 16) for n in fields[4].split(":"))
                total += tx + rx
    return total


@unittest.skipUnless(os.path.exists("/proc/net/tcp"), "needs Linux's /proc")
class MemoryBudgetTest(unittest.TestCase):
    PEERS = 64
    EVENT = 512 * 1024  # each peer's, without a newline: 32 MiB in all
    BUDGET = 4 * 1024 * 1024

    def test_unfinished_events_beyond_the_budget_go_out_in_pieces(self):
        letters = bytes(range(ord("0"), ord("0") + self.PEERS))
        total = self.PEERS * self.EVENT
        with tempfile.TemporaryDirectory() as tmp:
            out_path = os.path.join(tmp, "out")

            def written():
                with open(out_path, "rb") as f:
                    return len(f.read().replace(b"\n", b""))
            with Listener("-f", "raw", "-o", out_path, "--max-buffer-bytes",
                          str(self.BUDGET)) as listener:
                pid, port = listener.proc.pid, listener.address[1]
                start = memory_kib(pid, "VmRSS")
                peers = [listener.connect() for _ in letters]
                try:
                    for sock, letter in zip(peers, letters):
                        sock.sendall(bytes([letter]) * self.EVENT)
                    # Every byte is in the listener's hands: read from the
                    # kernel, which holds none for it any more.
                    listener.wait_for(lambda: unread_bytes(port) == 0,
                                      what="the listener to read it all")
                    peak = memory_kib(pid, "VmHWM")
                    early = written()
                finally:
                    for sock in peers:
                        sock.close()
                listener.wait_for(lambda: written() == total,
                                  what="every byte in the output")
                self.assertEqual(listener.stop(), 0)
            # Unbounded, the listener would have grown by the whole 32 MiB.
            grown = (peak - start) * 1024
            self.assertLess(grown, self.BUDGET + 8 * 1024 * 1024,
                            "RSS grew from %d to %d KiB" % (start, peak))
            # All but the budget went out while every peer still held its
            # event open.
            self.assertGreaterEqual(early, total - self.BUDGET)
            with open(out_path, "rb") as f:
                pieces = f.read().split(b"\n")
            self.assertEqual(pieces.pop(), b"")
            # Nothing lost or mixed: each piece is one peer's, and every
            # peer's bytes are all there.
            for piece in pieces:
                self.assertEqual(piece, piece[:1] * len(piece))
            self.assertEqual(Counter(b"".join(pieces)),
                             Counter({letter: self.EVENT
                                      for letter in letters}))
            self.assertIn("split into pieces: unfinished events held "
                          "reached --max-buffer-bytes (4.0 MiB)",
                          listener.stderr_text)


if __name__ == "__main__":
    unittest.main()
