"""--prefix: who sent each raw or text event, when, and where it came in."""

from __future__ import annotations

import datetime
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import unittest

from support import LISTENER, TIMEOUT, Listener, Process, user_env

PEERS = 4
EVENTS_PER_PEER = 3000
# 2026-12-07T23:01:02.123Z 127.0.0.2:51234 127.0.0.1:9998 event
PREFIXED = re.compile(
    rb"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) (\S+) (\S+) (.*)")


def parse_time(stamp: bytes) -> datetime.datetime:
    return datetime.datetime.strptime(
        stamp.decode(), "%Y-%m-%dT%H:%M:%S.%fZ").replace(
            tzinfo=datetime.timezone.utc)


def now() -> datetime.datetime:
    # The stamp has milliseconds: compare at that grain.
    moment = datetime.datetime.now(datetime.timezone.utc)
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def send_from(host: str, target: tuple, number: int, ready: threading.Barrier,
              names: dict) -> None:
    """Send this peer's events from host, in small writes among the
    others'; keep the address it sent from."""
    with socket.create_connection(target, timeout=TIMEOUT,
                                  source_address=(host, 0)) as sock:
        names[number] = "%s:%d" % sock.getsockname()[:2]
        ready.wait(TIMEOUT)
        for start in range(0, EVENTS_PER_PEER, 50):
            sock.sendall(b"".join(
                b"category=test peer=%d seq=%d\n" % (number, seq)
                for seq in range(start, start + 50)))


class SeveralPeersOneFileTest(unittest.TestCase):
    """Several CyberTraces write into one file: each event names its
    sender."""

    def run_peers(self, fmt: str, listen: str = "127.0.0.1:0") -> tuple:
        """Run the listener with --prefix time,peer,listen into a file;
        return (its lines, each peer's address, where it listened, the
        time span the events were sent in)."""
        total = PEERS * EVENTS_PER_PEER
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "events.log")
            with Listener("-f", fmt, "--prefix", "time,peer,listen", "-o",
                          path, "-n", str(total), listen=listen) as listener:
                target = ("127.0.0.1", listener.address[1])
                names = {}
                ready = threading.Barrier(PEERS)
                # Each peer from its own loopback address, as from its own
                # CyberTrace host.
                threads = [threading.Thread(
                    target=send_from, args=("127.0.0.%d" % (number + 2),
                                            target, number, ready, names))
                    for number in range(PEERS)]
                began = now()
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join(TIMEOUT)
                self.assertEqual(listener.finish(), 0, listener.stderr_text)
                ended = now()
                where = "%s:%d" % listener.address
            with open(path, "rb") as f:
                lines = f.read().splitlines()
        return lines, names, where, (began, ended)

    def check_events(self, events: list, names: dict, where: str,
                     span: tuple) -> None:
        seen = {number: [] for number in range(PEERS)}
        for line in events:
            found = PREFIXED.fullmatch(line)
            self.assertIsNotNone(found, line)
            stamp, peer, listen, event = found.groups()
            number, seq = map(int, re.fullmatch(
                rb"category=test peer=(\d+) seq=(\d+)", event).groups())
            self.assertEqual(peer.decode(), names[number], line)
            self.assertEqual(listen.decode(), where, line)
            self.assertTrue(span[0] <= parse_time(stamp) <= span[1],
                            (line, span))
            seen[number].append(seq)
        for number in range(PEERS):
            self.assertEqual(seen[number], list(range(EVENTS_PER_PEER)))

    def test_raw(self):
        lines, names, where, span = self.run_peers("raw")
        self.assertEqual(len(lines), PEERS * EVENTS_PER_PEER)
        self.check_events(lines, names, where, span)
        # The events of different peers did meet in the file.
        peers = [PREFIXED.fullmatch(line).group(2) for line in lines]
        self.assertGreater(sum(a != b for a, b in zip(peers, peers[1:])), 0)

    def test_text(self):
        lines, names, where, span = self.run_peers("text")
        self.assertEqual(lines[0::2], [b"Received:"] * (PEERS *
                                                        EVENTS_PER_PEER))
        self.check_events(lines[1::2], names, where, span)

    def test_listen_is_the_address_bound(self):
        # A wildcard address is named as -l gave it, not the address the
        # peer reached.
        lines, names, where, span = self.run_peers("raw", "0.0.0.0:0")
        self.assertTrue(where.startswith("0.0.0.0:"), where)
        self.check_events(lines, names, where, span)


class PrefixTest(unittest.TestCase):

    def run_listener(self, *args: str, send: bytes = b"event=1\n",
                     count: int = 1) -> bytes:
        with Listener(*args, "-n", str(count)) as listener:
            with listener.connect() as sock:
                sock.sendall(send)
                peer = "%s:%d" % sock.getsockname()[:2]
            self.assertEqual(listener.finish(), 0, listener.stderr_text)
            return bytes(listener.out), peer, "%s:%d" % listener.address

    def test_fields_in_the_order_given(self):
        out, peer, where = self.run_listener("-f", "raw", "--prefix",
                                             "listen,peer")
        self.assertEqual(out, ("%s %s event=1\n" % (where, peer)).encode())
        out, peer, where = self.run_listener("-f", "raw", "--prefix", "peer")
        self.assertEqual(out, ("%s event=1\n" % peer).encode())

    def test_time_alone(self):
        began = now()
        out, _, _ = self.run_listener("-f", "text", "--prefix", "time")
        head, stamp, rest = out.split(b"\n", 1)[0], out[10:34], out[34:]
        self.assertEqual(head, b"Received:")
        self.assertEqual(rest, b" event=1\n")
        self.assertTrue(began <= parse_time(stamp) <= now(), stamp)

    def test_every_piece_and_the_unfinished_last_event(self):
        # A long event split into pieces, and the last one without a
        # newline: each is written as an event, each with its prefix.
        out, peer, _ = self.run_listener(
            "-f", "raw", "--prefix", "peer", "--max-event-bytes", "4",
            send=b"abcdefghij\r\nlast", count=4)
        self.assertEqual(out, b"".join(peer.encode() + b" " + piece + b"\n"
                                       for piece in (b"abcd", b"efgh", b"ij",
                                                     b"last")))

    @unittest.skipUnless(hasattr(socket, "AF_UNIX"), "UNIX sockets")
    def test_no_field_holds_a_space_not_even_a_unix_peer(self):
        # "unix:/PATH (pid N)" names a UNIX peer; the path has a space.
        with tempfile.TemporaryDirectory(prefix="a b") as tmp:
            path = os.path.join(tmp, "ct.sock")
            with Process([sys.executable, str(LISTENER), "-l", "unix:" + path,
                          "-f", "raw", "--prefix", "peer,listen", "-n", "1"]
                         ) as listener:
                listener.wait_stderr("Waiting for programs here at unix:")
                with socket.socket(socket.AF_UNIX) as sock:
                    sock.settimeout(TIMEOUT)
                    sock.connect(path)
                    sock.sendall(b"event=1\n")
                self.assertEqual(listener.finish(), 0, listener.stderr_text)
        named = ("unix:" + path).replace(" ", "%20")
        peer = "%s%%20(pid%%20%d)" % (named, os.getpid()) \
            if hasattr(socket, "SO_PEERCRED") else named
        self.assertEqual(bytes(listener.out),
                         ("%s %s event=1\n" % (peer, named)).encode())

    def test_escape_shows_the_event_controls_not_the_prefix(self):
        out, peer, _ = self.run_listener("-f", "raw", "--escape", "--prefix",
                                         "peer", send=b"a\x1b[2Jb\n")
        self.assertEqual(out, peer.encode() + b" a\\x1b[2Jb\n")

    def test_without_prefix_events_are_as_received(self):
        out, _, _ = self.run_listener("-f", "raw")
        self.assertEqual(out, b"event=1\n")

    def test_bad_values_are_argument_errors(self):
        for value, words in (("time,peer,host", "unknown field 'host'"),
                             ("time,,peer", "empty field"),
                             ("", "empty field"),
                             ("Time", "unknown field 'Time'"),
                             ("peer,peer", "peer given twice")):
            with self.subTest(value=value):
                done = subprocess.run(
                    [sys.executable, str(LISTENER), "-l", "127.0.0.1:0",
                     "-f", "raw", "--prefix", value], capture_output=True,
                    timeout=TIMEOUT, env=user_env())
                self.assertEqual(done.returncode, 2, done.stderr)
                err = done.stderr.decode()
                self.assertEqual(err.count("\n"), 1, err)
                self.assertIn("argument --prefix", err)
                self.assertIn(words, err)
                if "twice" not in words:
                    self.assertIn("time,peer,listen", err)

    def test_not_with_json(self):
        done = subprocess.run(
            [sys.executable, str(LISTENER), "-l", "127.0.0.1:0", "-f", "json",
             "--prefix", "time"], capture_output=True, timeout=TIMEOUT,
            env=user_env())
        self.assertEqual(done.returncode, 2, done.stderr)
        self.assertEqual(done.stderr.count(b"\n"), 1, done.stderr)
        self.assertIn(b"not with -f json", done.stderr)

    def test_help_says_what_each_field_is(self):
        done = subprocess.run([sys.executable, str(LISTENER), "--help"],
                              capture_output=True, timeout=TIMEOUT,
                              env=user_env())
        text = " ".join(done.stdout.decode().split())
        self.assertIn("--prefix FIELDS", text)
        for words in ("time (when it was received, ISO 8601 UTC",
                      "peer (who sent it", "listen (where it came in: the "
                      "label of its -l, or the address", "white space and % "
                      "in a field as %XX", "not with -f json"):
            self.assertIn(words, text)


if __name__ == "__main__":
    unittest.main()
