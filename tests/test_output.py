"""Where events go: whole into pipes, never mixed with status lines on a
shared terminal, bounded while the output stalls, and the listener gone as
soon as its reader is."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tty
import unittest

from support import LISTENER, ROOT, TIMEOUT, Listener, user_env

import listen_events_cybertrace as lec


def read_all(fd: int) -> bytes:
    """Read a pipe to its end (every writer gone)."""
    data = bytearray()
    while True:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return bytes(data)
        data += chunk


def unread(fd: int) -> int:
    return lec.unread_count(fd) or 0


def high_water_mib(pid: int) -> int:
    """Return the most memory the process ever held, in MiB (Linux)."""
    with open("/proc/%d/status" % pid) as status:
        return int(re.search(r"VmHWM:\s+(\d+)", status.read()).group(1)) \
            // 1024


@unittest.skipUnless(hasattr(fcntl, "F_GETPIPE_SZ"), "Linux pipes")
class PipeTest(unittest.TestCase):
    def test_a_stalled_pipe_gets_only_whole_events(self):
        # Three 300,000-byte events fill the 1 MiB pipe; the fourth must
        # wait for room for all of it, not go in a piece its reader would
        # find cut short after SIGTERM.
        size = 300000
        reader, writer = os.pipe()
        try:
            with Listener("-f", "raw", stdout=writer) as listener:
                os.close(writer)
                writer = None
                if fcntl.fcntl(reader, fcntl.F_GETPIPE_SZ) < 1 << 20:
                    self.skipTest("pipes cannot be widened to 1 MiB here")
                with listener.connect() as sock:
                    sock.sendall((b"e" * (size - 1) + b"\n") * 4)
                    listener.wait_for(lambda: unread(reader) >= 3 * size,
                                      what="3 events in the pipe")
                    self.assertEqual(listener.stop(), 1)
                self.assertRegex(listener.stderr_text.splitlines()[-1],
                                 r"error: gave up writing to stdout")
                self.assertIn("Stopped: 3 events (1 more received, not "
                              "written)", listener.stderr_text)
            data = read_all(reader)
            self.assertEqual(len(data), 3 * size)
            self.assertEqual(data, (b"e" * (size - 1) + b"\n") * 3)
        finally:
            os.close(reader)
            if writer is not None:
                os.close(writer)

    def test_the_listener_ends_when_its_reader_does(self):
        # listen | head -1: head exits after the first event, and no other
        # event comes to fail a write; the listener must end anyway.
        head = subprocess.Popen(["head", "-n", "1"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE)
        try:
            with Listener("-f", "raw", stdout=head.stdin) as listener:
                head.stdin.close()
                with listener.connect() as sock:
                    sock.sendall(b"first\n")
                    self.assertEqual(head.stdout.readline(), b"first\n")
                    head.wait(TIMEOUT)
                    gone = time.monotonic()
                    self.assertEqual(listener.finish(), 1)
                    # As coreutils' tail -f: within a second, no write
                    # needed to find out.
                    self.assertLess(time.monotonic() - gone, 1.0)
                err = listener.stderr_text
                self.assertIn("Stopped: 1 event, 6 bytes received", err)
                self.assertRegex(err.splitlines()[-1], r"^\S+: error: cannot "
                                 r"write to stdout: Broken pipe$")
        finally:
            head.stdout.close()
            head.wait(TIMEOUT)

    def test_events_its_reader_left_in_the_pipe_are_not_written(self):
        # head -c takes 100,000 bytes of the FIFO; the rest of what the
        # pipe held went with it, and must not be counted as written.
        events = [b"event=%04d %s\n" % (index, b"x" * 990)
                  for index in range(1000)]
        with tempfile.TemporaryDirectory() as tmp:
            fifo = os.path.join(tmp, "events")
            os.mkfifo(fifo)
            # Open before the listener's -o, which needs a reader there.
            fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
            os.set_blocking(fd, True)
            with open(fd, "rb", buffering=0) as head:
                with Listener("-f", "raw", "-o", fifo) as listener, \
                        listener.connect() as sock:
                    sock.sendall(b"".join(events))
                    listener.wait_for(lambda: unread(head.fileno()) >=
                                      900 * 1000, what="a full pipe")
                    got = b""
                    while len(got) < 100000:
                        got += head.read(100000 - len(got))
                    head.close()
                    self.assertEqual(listener.finish(), 1)
                    err = listener.stderr_text
        whole = got.count(b"\n")
        self.assertEqual(got, b"".join(events)[:100000])
        found = re.search(r"Stopped: ([\d,]+) events \(([\d,]+) more "
                          r"received, not written; ([\d,]+) of them "
                          r"\(([\d.]+) KiB\) left unread in the pipe by its "
                          r"reader\)", err)
        self.assertIsNotNone(found, err)
        self.assertEqual(int(found.group(1)), whole)
        self.assertEqual(int(found.group(2).replace(",", "")), 1000 - whole)
        self.assertLessEqual(int(found.group(3).replace(",", "")),
                             1000 - whole)
        self.assertRegex(err.splitlines()[-1], r"cannot write to .*events: "
                         r"Broken pipe$")

    def test_a_stalled_output_holds_events_within_the_buffer_budget(self):
        # 48 peers hold 1/3 MiB of \x01 each (16 MiB), which JSON writes
        # six times as long; their events time out while stdout takes
        # nothing.  Memory must stay near --max-buffer-bytes, not grow by
        # the formatted size.
        reader, writer = os.pipe()
        budget = 20 << 20
        try:
            with Listener("-f", "json", "--event-timeout", "1",
                          "--max-buffer-bytes", str(budget),
                          stdout=writer) as listener:
                os.close(writer)
                writer = None
                before = high_water_mib(listener.proc.pid)
                peers = []
                try:
                    for _ in range(48):  # 96 lines: not throttled
                        sock = listener.connect()
                        peers.append(sock)
                        sock.sendall(b"\x01" * ((16 << 20) // 48))
                    listener.wait_for(lambda: listener.stderr_text.count(
                        "(event unfinished after 1 s)") == 48,
                        what="48 connections timed out")
                    grown = high_water_mib(listener.proc.pid) - before
                finally:
                    for sock in peers:
                        sock.close()
                os.close(reader)  # the reader goes: the listener ends
                reader = None
                self.assertEqual(listener.finish(), 1)
            self.assertLess(grown, 2 * (16 << 20) >> 20,
                            "grew by %d MiB" % grown)
            self.assertIn("Stopped: 0 events (48 more received, not "
                          "written", listener.stderr_text)
        finally:
            for fd in (reader, writer):
                if fd is not None:
                    os.close(fd)


class SharedTerminalTest(unittest.TestCase):
    def test_status_lines_go_between_whole_events_on_a_slow_terminal(self):
        # Events and status on one raw terminal read 4 KiB every 2 ms; one
        # peer floods, others come and go.
        size = 3000
        primary, secondary = pty.openpty()
        tty.setraw(secondary)
        screen = bytearray()
        done = threading.Event()

        def read_slowly():
            while True:
                try:
                    data = os.read(primary, 4096)
                except OSError:  # EIO: the listener closed its end
                    return
                if not data:
                    return
                screen.extend(data)
                if not done.is_set():
                    time.sleep(0.002)

        proc = subprocess.Popen(
            [sys.executable, str(LISTENER), "-l", "127.0.0.1:0", "-f",
             "raw"], stdout=secondary, stderr=secondary, env=user_env())
        os.close(secondary)
        thread = threading.Thread(target=read_slowly, daemon=True)
        thread.start()
        try:
            deadline = time.monotonic() + TIMEOUT
            while not re.search(rb"Starting on 127\.0\.0\.1:(\d+)",
                                bytes(screen)):
                self.assertLess(time.monotonic(), deadline, bytes(screen))
                time.sleep(0.01)
            port = int(re.search(rb"Starting on 127\.0\.0\.1:(\d+)",
                                 bytes(screen)).group(1))
            ends = time.monotonic() + 1.5
            with socket.create_connection(("127.0.0.1", port),
                                          timeout=TIMEOUT) as flood:
                flood.setblocking(False)
                batch = (b"E" * (size - 1) + b"\n") * 20
                rest = b""  # what a send left of the batch: events whole
                while time.monotonic() < ends:
                    try:
                        rest = rest or batch
                        rest = rest[flood.send(rest):]
                    except BlockingIOError:
                        pass
                    with socket.create_connection(("127.0.0.1", port),
                                                  timeout=TIMEOUT):
                        pass
                    time.sleep(0.02)
                # A peer that closed mid-event would leave a torn last
                # event, written as such: finish the batch first.
                flood.settimeout(TIMEOUT)
                flood.sendall(rest)
            done.set()
            proc.send_signal(signal.SIGTERM)
            self.assertEqual(proc.wait(TIMEOUT), 0)
            thread.join(TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(TIMEOUT)
            thread.join(TIMEOUT)
            os.close(primary)
        text = bytes(screen).decode("utf-8", "replace")
        self.assertIn("Stopped:", text)
        events = 0
        for line in text.split("\n"):
            # The live line is rewritten with \r: only the last part of a
            # line stays on screen, and an event may be nothing but that.
            parts = line.split("\r")
            self.assertFalse(any("E" in part for part in parts[:-1]) or (
                "E" in parts[-1] and parts[-1] != "E" * (size - 1)),
                "an event mixed with a status line: %r ... %r"
                % (line[:100], line[-100:]))
            events += parts[-1] == "E" * (size - 1)
        self.assertGreater(events, 0)


class ContribTest(unittest.TestCase):
    def test_the_listener_unit_restricts_peers_and_logs_rotate(self):
        unit = (ROOT / "contrib" / "systemd" /
                "cybertrace-listener.service").read_text()
        command = shlex.split(re.search(r"^ExecStart=(.*)$", unit,
                                        re.M).group(1))
        self.assertTrue(command[1].endswith("listen_events_cybertrace.py"))
        args = lec.build_parser().parse_args(command[2:])
        self.assertTrue(args.allow, "the unit listens with no --allow")
        self.assertIn("--allow", unit)
        rotate = (ROOT / "contrib" / "logrotate" /
                  "cybertrace-listener").read_text()
        self.assertIn(args.output, rotate)
        self.assertRegex(rotate, r"postrotate\s+systemctl reload "
                         r"cybertrace-listener")


if __name__ == "__main__":
    unittest.main()
