"""The sender at a console: what it refuses, warns about and reports."""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import unittest

from fake_cybertrace import FakeCyberTrace
from support import SENDER, TIMEOUT, user_env


def run_sender(*args: str, stdin: bytes = b"", timeout: float = TIMEOUT):
    """Run the sender to its end; return the completed process."""
    return subprocess.run([sys.executable, str(SENDER), *args], input=stdin,
                          capture_output=True, timeout=timeout,
                          env=user_env())


def address(server) -> str:
    return "%s:%d" % server.address


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
        self.assertRegex(err.splitlines()[-1], pattern)

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
        with FakeCyberTrace() as ct:
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
                FakeCyberTrace() as ct:
            f.write(content)
            f.flush()
            proc = run_sender("-c", address(ct), "--repeat", "2", f.name,
                              "-", stdin=b"\x00stdin\n")
            self.assertEqual(proc.returncode, 0, proc.stderr)
            self.assertEqual(ct.received(), (content + b"\x00stdin\n") * 2)
        lines = proc.stderr.decode().splitlines()
        self.assertEqual(lines[:2], [
            "warning: %s looks binary (NUL bytes in its first 512 KiB); "
            "sending it as it is" % f.name,
            "warning: stdin looks binary (NUL bytes in its first 512 KiB); "
            "sending it as it is"])
        self.assertRegex(lines[2], r"^Sent 14 events")
        self.assertEqual(len(lines), 3, lines)

    def test_text_gives_no_warning(self):
        with FakeCyberTrace() as ct:
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
            with self.subTest(summary), FakeCyberTrace() as ct:
                proc = run_sender("--reply-back", "-c", address(ct), *events)
            self.assertEqual(proc.returncode, 0, proc.stderr)
            self.assertRegex(proc.stderr.decode(),
                             r"^Sent \d+ events?, .*; %s\n$" % summary)


if __name__ == "__main__":
    unittest.main()
