"""The sender at a console: what it refuses, warns about and reports."""

from __future__ import annotations

import os
import re
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import unittest

from support import (SENDER, TIMEOUT, RecordingStandIn, address, run_sender,
                     user_env)
from test_sender import Sink

try:
    import fcntl
    import pty
    import termios
except ImportError:  # not a POSIX system: no pseudo-terminals
    pty = None

NOTICE = (b"Reading events from the terminal: each line is sent when you "
          b"press Enter; Ctrl+D to finish")


class Server:
    """A listening socket that accepts nothing: tells whether one connected."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = self.sock.getsockname()[:2]

    def connected(self) -> bool:
        """Return whether a connection waits in the accept queue."""
        # The kernel completes the handshake before accept(): a sender that
        # connected and exited left its connection in the queue.
        self.sock.setblocking(False)
        try:
            sock, _ = self.sock.accept()
        except BlockingIOError:
            return False
        sock.close()
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.sock.close()


class RefuseTest(unittest.TestCase):
    def assert_refused(self, proc, pattern: str) -> None:
        err = proc.stderr.decode()
        self.assertEqual(proc.returncode, 2, err)
        self.assertNotIn("Traceback", err)
        self.assertEqual(len(err.splitlines()), 1, err)  # no usage block
        self.assertRegex(err, pattern)

    def test_ping_refuses_what_it_would_ignore(self):
        with tempfile.NamedTemporaryFile() as f:
            cases = [((f.name,), "FILE"), (("-",), "FILE"),
                     (("-e", "x=1"), "-e/--event"), (("--demo",), "--demo"),
                     (("--rate", "10"), "--rate"),
                     (("--repeat", "2"), "--repeat"),
                     (("-v",), "-v/--verbose")]
            for extra, name in cases:
                with self.subTest(extra=extra), Server() as server:
                    proc = run_sender("--ping", "-c", address(server), *extra)
                    self.assert_refused(proc, r"error: argument --ping: not "
                                        r"allowed with %s" % name)
                    self.assertFalse(server.connected())

    def test_stdin_twice_is_refused(self):
        with Server() as server:
            proc = run_sender("-", "-", "-c", address(server), stdin=b"x\n")
            self.assert_refused(proc, r"error: argument FILE: '-' \(stdin\) "
                                r"given more than once")
            self.assertFalse(server.connected())

    def test_ping_with_quiet_and_timeout_still_works(self):
        with RecordingStandIn() as ct:
            proc = run_sender("--ping", "-q", "-t", "5", "-c", address(ct))
        self.assertEqual((proc.returncode, proc.stderr), (0, b""))


class NothingToSendTest(unittest.TestCase):
    def test_no_events_warns_and_exits_1_without_connecting(self):
        sources = [("empty file", b"", ()), ("blank lines", b"\n \r\n\t\n",
                   ()), ("empty stdin", None, ()),
                   ("empty -e", None, ("-e", "", "-e", "  ")),
                   ("empty file, repeated", b"", ("--repeat", "3")),
                   ("empty stdin, --reply-back", None, ("--reply-back",)),
                   ("blank lines, --rate", b"\n\n", ("--rate", "5"))]
        for what, content, extra in sources:
            with self.subTest(what), Server() as server, \
                    tempfile.NamedTemporaryFile() as f:
                args = list(extra)
                if content is not None:
                    f.write(content)
                    f.flush()
                    args.append(f.name)
                proc = run_sender("-c", address(server), *args)
                self.assertEqual(proc.returncode, 1, proc.stderr)
                self.assertEqual(proc.stderr, b"warning: no events to send\n")
                self.assertFalse(server.connected())

    def test_quiet_keeps_the_warning(self):
        with Server() as server:
            proc = run_sender("-q", "-c", address(server))
            self.assertEqual((proc.returncode, proc.stderr),
                             (1, b"warning: no events to send\n"))
            self.assertFalse(server.connected())


class BinaryTest(unittest.TestCase):
    def test_nul_bytes_warn_once_and_are_sent(self):
        content = b"first\x00event\n\x00\x01\x02 binary\n" * 3
        with tempfile.NamedTemporaryFile(suffix=".bin") as f, \
                RecordingStandIn() as ct:
            f.write(content)
            f.flush()
            proc = run_sender("-c", address(ct), "--repeat", "2", f.name,
                              "-", stdin=b"\x00stdin\n")
            self.assertEqual(proc.returncode, 0, proc.stderr)
            want = (content + b"\x00stdin\n") * 2
            wait_until(lambda: len(ct.received()) >= len(want), "the events")
            self.assertEqual(ct.received(), want)
        lines = proc.stderr.decode().splitlines()
        self.assertEqual(lines[:2], [
            "warning: %s looks binary (NUL bytes in its first 512 KiB); "
            "sending it as it is" % f.name,
            "warning: stdin looks binary (NUL bytes in its first 512 KiB); "
            "sending it as it is"])
        self.assertRegex(lines[2], r"^Sent 14 events")
        self.assertEqual(len(lines), 3, lines)

    def test_text_gives_no_warning(self):
        with RecordingStandIn() as ct:
            proc = run_sender("-c", address(ct), stdin=b"\xff\xfe text\n")
            self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertNotIn(b"warning", proc.stderr)


class WordsTest(unittest.TestCase):
    def test_help_says_what_acknowledged_means(self):
        proc = run_sender("--help")
        self.assertEqual(proc.returncode, 0)
        text = " ".join(proc.stdout.decode().split())
        self.assertIn("'Acknowledged by the peer' means that the peer's TCP "
                      "stack received the bytes, not that a program read or "
                      "processed them", text)
        self.assertIn("a listener that rejects the connection after the TCP "
                      "handshake still acknowledges", text)

    def test_reply_back_counts_detections_apart(self):
        cases = [(("-e", "url=http://fakess123.nu", "-e", "nothing",
                   "-e", "md5=776735A8CA96DB15B422879DA599F474 dst=192.0.2.1",
                   "-e", "nothing either"), "4 events answered: 3 detections"),
                 (("-e", "nothing"), "1 event answered: 0 detections"),
                 (("-e", "src=192.0.2.4"), "1 event answered: 1 detection")]
        for events, summary in cases:
            with self.subTest(summary), RecordingStandIn() as ct:
                proc = run_sender("--reply-back", "-c", address(ct), *events)
            self.assertEqual(proc.returncode, 0, proc.stderr)
            self.assertRegex(proc.stderr.decode(),
                             r"^Sent \d+ events?, .*; %s\n$" % summary)


def wait_until(predicate, what: str, timeout: float = TIMEOUT) -> None:
    """Wait until predicate() holds, polling; fail after timeout."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for " + what)
        time.sleep(0.01)


def tcp_states(port: int) -> set:
    """Return the TCP states of this host's sockets connected to port."""
    states = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if int(fields[2].rsplit(":", 1)[1], 16) == port:
                states.add(int(fields[3], 16))
    return states


SYN_SENT, FIN_WAIT1 = 2, 4


def take_terminal() -> None:
    # In the child, a session leader after setsid(): make the pty on its
    # stderr the controlling terminal, so that Ctrl+C there sends SIGINT.
    fcntl.ioctl(2, termios.TIOCSCTTY, 0)


class Console:
    """The sender run at a terminal: stderr (and stdin) on a pty."""

    # Written by the test after the sender's exit: the reader stops there.
    # (Waiting for EIO instead loses the sender's last line now and then:
    # Linux may report the pty closed before handing over what it holds.)
    END = b"<end of test>"

    def __init__(self, *args: str, stdin=None) -> None:
        self.master, self.slave = pty.openpty()
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ,
                    struct.pack("HHHH", 40, 132, 0, 0))
        try:
            self.proc = subprocess.Popen(
                [sys.executable, str(SENDER), *args],
                stdin=self.slave if stdin is None else stdin,
                stdout=subprocess.PIPE, stderr=self.slave, env=user_env(),
                start_new_session=True, preexec_fn=take_terminal)
        except BaseException:
            os.close(self.slave)
            os.close(self.master)
            raise
        self.started = time.monotonic()
        self.screen = bytearray()  # all the terminal got, echo included
        self.out = bytearray()
        self.cond = threading.Condition()
        self.threads = [threading.Thread(target=self.collect, args=(
            lambda: os.read(self.master, 65536), self.screen), daemon=True),
            threading.Thread(target=self.collect, args=(
                lambda: os.read(self.proc.stdout.fileno(), 65536),
                self.out), daemon=True)]
        for thread in self.threads:
            thread.start()

    def collect(self, read, buf: bytearray) -> None:
        while True:
            try:
                data = read()
            except OSError:  # EIO: the terminal's last user closed it
                data = b""
            with self.cond:
                buf += data
                self.cond.notify_all()
                if not data or buf.endswith(self.END):
                    return

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def wait_screen(self, pattern: bytes, timeout: float = TIMEOUT):
        """Wait until the terminal shows pattern; return the match."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                found = re.search(pattern, self.screen)
                if found:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        "timed out waiting for %r on the terminal; it shows "
                        "%r" % (pattern, bytes(self.screen[-500:])))
                self.cond.wait(min(left, 0.05))

    def finish(self) -> int:
        """Wait for the exit and the terminal's last bytes."""
        try:
            status = self.proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(TIMEOUT)
            raise AssertionError("sender did not exit; terminal: %r"
                                 % bytes(self.screen[-500:]))
        self.took = time.monotonic() - self.started
        os.write(self.slave, self.END)
        for thread in self.threads:
            thread.join(TIMEOUT)
        with self.cond:
            if not self.screen.endswith(self.END):
                raise AssertionError("the terminal's end never came: %r"
                                     % bytes(self.screen[-500:]))
            del self.screen[-len(self.END):]
        return status

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(TIMEOUT)
        os.close(self.slave)  # the reader, if still there, gets EIO
        for thread in self.threads:
            thread.join(TIMEOUT)
        self.proc.stdout.close()
        os.close(self.master)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def visible(self) -> list:
        """Return the lines a person sees, the cursor's line last."""
        lines, line, column = [], bytearray(), 0
        for token in re.split(rb"(\r|\n|\x08)", bytes(self.screen)):
            if token == b"\r":
                column = 0
            elif token == b"\x08":
                column = max(0, column - 1)
            elif token == b"\n":
                lines.append(bytes(line))
                line, column = bytearray(), 0
            else:
                line[column:column + len(token)] = token
                column += len(token)
        return [text.rstrip(b" ") for text in lines + [bytes(line)]]


@unittest.skipIf(pty is None, "no pseudo-terminals here")
class TerminalTest(unittest.TestCase):
    def test_typing_events_at_the_terminal_says_how_to_finish(self):
        with RecordingStandIn() as ct, Console("-c", address(ct)) as console:
            console.wait_screen(re.escape(NOTICE + b"\r\n"))
            console.type(b"first event\n")
            wait_until(lambda: ct.received() == b"first event\n",
                       "the first event, sent as typed")
            console.type(b"second event\n\x04")
            self.assertEqual(console.finish(), 0)
            self.assertEqual(ct.received(), b"first event\nsecond event\n")
        screen = bytes(console.screen)
        self.assertEqual(screen.count(NOTICE), 1)
        self.assertTrue(screen.startswith(NOTICE), screen)
        self.assertRegex(screen, rb"\r\nSent 2 events, 25 bytes to .*\r\n$")

    def test_a_wrong_connect_shows_at_once(self):
        # Nothing typed: the error comes before the first line, alone.
        with Server() as server:
            port = server.address[1]  # closed: nothing listens there
        with Console("-c", "127.0.0.1:%d" % port) as console:
            self.assertEqual(console.finish(), 1)
        self.assertEqual(console.visible(), [
            b"send_events_cybertrace.py: error: cannot connect to "
            b"127.0.0.1:%d: Connection refused" % port, b""])

    def test_nothing_typed_sends_nothing(self):
        with RecordingStandIn() as ct, Console("-c", address(ct)) as console:
            console.wait_screen(re.escape(NOTICE + b"\r\n"))
            console.type(b"\x04")
            self.assertEqual(console.finish(), 1)
            self.assertEqual(ct.received(), b"")
        self.assertIn(b"no events to send", bytes(console.screen))

    def test_reconnect_waits_for_the_peer_before_the_first_line(self):
        with Server() as server:
            port = server.address[1]
        with Console("--reconnect", "-c", "127.0.0.1:%d" % port) as console:
            # The peer is not there: it says so, and waits for it.
            console.wait_screen(rb"warning: cannot connect to 127\.0\.0\.1:"
                                rb"%d \(Connection refused\); retrying" % port)
            self.assertNotIn(NOTICE, bytes(console.screen))
            with RecordingStandIn(input=("127.0.0.1", port)) as ct:
                console.wait_screen(rb"connected after [\d.]+ s")
                console.wait_screen(re.escape(NOTICE + b"\r\n"))
                console.type(b"typed\n\x04")
                self.assertEqual(console.finish(), 0)
                self.assertEqual(ct.received(), b"typed\n")
        self.assertRegex(bytes(console.screen), rb"Sent 1 event")

    def test_no_notice_when_stdin_is_not_read_or_not_a_terminal(self):
        with tempfile.NamedTemporaryFile() as f:
            f.write(b"from a file\n")
            f.flush()
            for args, stdin in (((f.name,), None), (("-e", "x"), None),
                                ((), f.name)):
                with self.subTest(args=args, stdin=stdin), \
                        RecordingStandIn() as ct, open(stdin or os.devnull) \
                        as source, Console("-c", address(ct), *args,
                                           stdin=source if stdin else None) \
                        as console:
                    self.assertEqual(console.finish(), 0)
                    self.assertNotIn(b"terminal", bytes(console.screen))
                    self.assertRegex(bytes(console.screen), rb"^Sent 1 event")

    def test_quiet_says_nothing_at_the_terminal(self):
        with RecordingStandIn() as ct, Console("-q", "-c", address(ct)) \
                as console:
            console.type(b"typed\n\x04")
            self.assertEqual(console.finish(), 0)
            self.assertEqual(ct.received(), b"typed\n")
        # The terminal echoes what was typed, and shows nothing else.
        self.assertEqual(bytes(console.screen).replace(b"^D\x08\x08", b""),
                         b"typed\r\n")


INTERRUPTED = (rb"send_events_cybertrace\.py: interrupted: ([\d,]+) events?"
               rb" sent, ([\d,]+) acknowledged")


# The progress line: events, bytes, rate, then a percentage and an ETA.
PROGRESS = (rb"\r([\d,]+ events?  [\d.,]+ (?:bytes?|KiB|MiB)  [\d,]+/s  "
            rb"[\d,]+ acknowledged)")
PERCENT_ETA = rb"  (\d+)%  ETA (?:\d+:\d\d:\d\d|[\d.]+ s)"


def number(text: bytes) -> int:
    return int(text.replace(b",", b""))


class ConsoleTestCase(unittest.TestCase):
    def interrupt(self, console: Console, tail: bytes = b"",
                  keys: bytes = b"\x03") -> tuple:
        """Type Ctrl+C; check the one line it prints; return its counts."""
        console.type(keys)
        self.assertEqual(console.finish(), 130)
        screen = bytes(console.screen)
        self.assertNotIn(b"Traceback", screen)
        # The terminal echoes ^C; our line follows, alone, and is the last.
        found = re.search(rb"(?:^|\n|\r)" + INTERRUPTED + tail +
                          rb"\r\n$", screen)
        self.assertIsNotNone(found, screen[-300:])
        self.assertEqual(screen.count(b"interrupted"), 1, screen[-300:])
        sent, acked = number(found.group(1)), number(found.group(2))
        self.assertLessEqual(acked, sent)
        return sent, acked


@unittest.skipIf(pty is None, "no pseudo-terminals here")
class InterruptTest(ConsoleTestCase):
    """Ctrl+C, typed on the terminal, at every stage of a send."""

    @unittest.skipUnless(os.path.exists("/proc/net/tcp"), "needs Linux")
    def test_while_connecting(self):
        with socket.create_server(("127.0.0.1", 0), backlog=0) as server, \
                socket.create_connection(server.getsockname()):
            # The queue is full: the kernel drops the next SYNs, and the
            # sender waits in connect().
            port = server.getsockname()[1]
            with Console("-e", "x", "-t", "30", "-c",
                         "127.0.0.1:%d" % port) as console:
                wait_until(lambda: SYN_SENT in tcp_states(port),
                           "the sender's SYN")
                self.assertEqual(self.interrupt(console), (0, 0))

    def test_while_typing_before_and_after_connecting(self):
        # At a terminal the sender connects before the first line is
        # typed, and only then says how to type events.
        with Server() as server, Console("-c", address(server)) as console:
            console.wait_screen(re.escape(NOTICE))
            wait_until(server.connected, "the connection, before any line")
            self.assertEqual(self.interrupt(console), (0, 0))
        with RecordingStandIn() as ct, Console("-c", address(ct)) as console:
            console.wait_screen(re.escape(NOTICE))
            console.type(b"one\n")
            wait_until(lambda: ct.received() == b"one\n", "the event")
            self.assertEqual(self.interrupt(console), (1, 1))
        # The message writes over the ^C the terminal echoed.
        self.assertEqual(console.visible()[-3:], [
            b"one", b"send_events_cybertrace.py: interrupted: 1 event sent, "
            b"1 acknowledged", b""])

    def test_while_sending_at_a_rate(self):
        with tempfile.NamedTemporaryFile() as f, Sink() as sink:
            f.write(b"".join(b"event %d\n" % i for i in range(1000)))
            f.flush()
            with Console("--rate", "20", f.name, "-c", address(sink)) \
                    as console:
                console.wait_screen(rb"\r[1-9][\d,]* events?  ")
                wait_until(lambda: bytes(sink.data).count(b"\n") >= 3,
                           "3 events at the peer")
                arrived = bytes(sink.data).count(b"\n")
                sent, acked = self.interrupt(console)
            self.assertTrue(sink.done.wait(TIMEOUT))
        # Every event counted as sent arrived, no more.  (The peer may have
        # read events it had not acknowledged yet: delayed ACKs.)
        self.assertGreaterEqual(sent, arrived)
        self.assertEqual(bytes(sink.data),
                         b"".join(b"event %d\n" % i for i in range(sent)))
        # The progress line was erased before the message took its place.
        self.assertRegex(console.visible()[-2], b"^" + INTERRUPTED + b"$")

    def test_while_blocked_sending_to_a_peer_that_stopped_reading(self):
        with tempfile.NamedTemporaryFile() as f, Sink("stall") as sink:
            f.write(b"event\n" * 2000000)
            f.flush()
            with Console(f.name, "-t", "30", "-c", address(sink)) as console:
                console.wait_screen(PROGRESS + PERCENT_ETA)
                sent, acked = self.interrupt(console)
        self.assertLess(sent, 2000000)
        self.assertEqual(console.visible()[-1], b"")
        self.assertRegex(console.visible()[-2], b"^" + INTERRUPTED + b"$")

    def test_twice_in_a_row(self):
        # The second Ctrl+C lands while the first is reported, or after the
        # exit: either way one line, the counts, no traceback.
        with tempfile.NamedTemporaryFile() as f, Sink("stall") as sink:
            f.write(b"event\n" * 2000000)
            f.flush()
            with Console(f.name, "-t", "30", "-c", address(sink)) as console:
                console.wait_screen(PROGRESS + PERCENT_ETA)
                sent, acked = self.interrupt(console, keys=b"\x03\x03")
        self.assertGreater(sent, 0)
        self.assertEqual(console.visible()[-1], b"")
        self.assertRegex(console.visible()[-2], b"^" + INTERRUPTED + b"$")

    @unittest.skipUnless(os.path.exists("/proc/net/tcp"), "needs Linux")
    def test_while_waiting_for_acknowledgements(self):
        with tempfile.NamedTemporaryFile() as f, Sink("stall") as sink:
            f.write(b"event\n" * 20000)
            f.flush()
            port = sink.address[1]
            with Console(f.name, "-t", "30", "-c", address(sink)) as console:
                # After its last send the sender shuts down its side: the
                # FIN waits behind the bytes the peer has not acknowledged.
                wait_until(lambda: FIN_WAIT1 in tcp_states(port),
                           "the sender's FIN")
                sent, acked = self.interrupt(console)
        self.assertEqual(sent, 20000)
        self.assertLess(acked, 20000)

    def test_while_waiting_for_answers(self):
        with RecordingStandIn(answer=False) as ct, Console(
                "--reply-back", "-t", "30", "-c", address(ct), "-e",
                "url=http://fakess123.nu", "-e", "two") as console:
            wait_until(lambda: ct.received() == b"url=http://fakess123.nu\n"
                       b"two\n", "both events")
            counts = self.interrupt(
                console, rb"; 0 events answered: 0 detections")
        self.assertEqual(counts, (2, 2))


@unittest.skipIf(pty is None, "no pseudo-terminals here")
class ProgressTest(ConsoleTestCase):
    LINE = PROGRESS
    ETA = PERCENT_ETA

    def test_a_large_file_shows_percent_and_eta_then_clears(self):
        with tempfile.NamedTemporaryFile() as f, Sink("stall") as sink:
            f.write(b"event\n" * 2000000)
            f.flush()
            with Console(f.name, "-t", "30", "-c", address(sink)) as console:
                console.wait_screen(self.LINE + self.ETA)
                sink.release.set()
                self.assertEqual(console.finish(), 0)
            self.assertTrue(sink.done.wait(TIMEOUT))
            self.assertEqual(len(sink.data), 12000000)
        screen = bytes(console.screen)
        self.assertEqual(len(console.visible()), 2, console.visible())
        self.assertRegex(console.visible()[0], rb"^Sent 2,000,000 events, "
                         rb"11\.4 MiB to [^\r]* s$")
        self.assertEqual(console.visible()[1], b"")
        # A few redraws a second at most, whatever the load.
        draws = len(re.findall(self.LINE, screen))
        self.assertLessEqual(draws, console.took / 0.2 + 2)
        self.assertNotIn(b"\n", screen[:screen.rindex(b"Sent ")])

    def test_a_rate_shows_events_and_rate(self):
        with Sink() as sink, tempfile.NamedTemporaryFile() as f:
            f.write(b"\x00 binary\n")
            f.flush()
            with Console("--rate", "40", "-c", address(sink), "-", f.name,
                         stdin=subprocess.PIPE) as console:
                console.proc.stdin.write(b"event\n" * 30)
                console.proc.stdin.flush()
                console.wait_screen(self.LINE + rb"  [\d.]+ s")
                # The file's warning goes above the line, erased first.
                console.proc.stdin.close()
                self.assertEqual(console.finish(), 0)
        screen = bytes(console.screen)
        # Erased with spaces, then written over.
        self.assertRegex(screen, rb"/s  [^\r]*\r +\rwarning: \S+ looks "
                         rb"binary [^\n]*\r\n")
        lines = console.visible()
        self.assertEqual(len(lines), 3, lines)
        self.assertRegex(lines[0], rb"^warning: \S+ looks binary \(NUL bytes "
                         rb"in its first 512 KiB\); sending it as it is$")
        self.assertRegex(lines[1], rb"^Sent 31 events, 189 bytes to [^\r]* s$")
        self.assertEqual(lines[2], b"")
        self.assertNotIn(b"%", screen)  # a pipe's length is unknown

    def test_a_small_file_at_a_rate_shows_how_far_the_send_went(self):
        # The file is read at once, but sent over ten seconds: the
        # percentage follows what was sent, not what was read.
        with tempfile.NamedTemporaryFile() as f, Sink() as sink:
            f.write(b"".join(b"event %d\r\n\n" % i for i in range(1000)))
            f.flush()
            with Console("--rate", "100", f.name, "-c", address(sink)) \
                    as console:
                found = console.wait_screen(self.LINE + self.ETA)
                # No further than the share of events sent (lines shrink
                # from 13 bytes to 10, at most).
                events = number(found.group(1).split()[0])
                self.assertLessEqual(int(found.group(2)), events / 10 + 1)
                sent, _ = self.interrupt(console)
        self.assertLess(sent, 1000)

    def test_none_when_quiet_or_not_a_terminal(self):
        with Sink() as sink, Console("-q", "--rate", "20", "-c",
                                     address(sink), "-e", "a", "-e", "b",
                                     "-e", "c", "-e", "d", "-e", "e",
                                     "-e", "f", "-e", "g") as console:
            self.assertEqual(console.finish(), 0)
            self.assertEqual(bytes(console.screen), b"")
        with Sink() as sink:
            proc = run_sender("--rate", "20", "-c", address(sink),
                              stdin=b"event\n" * 8)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertRegex(proc.stderr.decode(), r"^Sent 8 events, [^\r]*\n$")


if __name__ == "__main__":
    unittest.main()
