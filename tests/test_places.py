"""Several -l addresses in one listener, and UNIX stream sockets: driven as
a user drives them, with real sockets and subprocesses (issue 21)."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import unittest
from pathlib import Path

from support import LISTENER, SENDER, TIMEOUT, Process, run_sender, user_env

import listen_events_cybertrace as lec

STAND_IN = Path(LISTENER).parent / "fake_cybertrace.py"
STARTED = r"Starting on (\S+)(?: as (\S+))?(?: \(|\n)"
UNIX = hasattr(socket, "AF_UNIX")


def listener(*args: str) -> Process:
    """Start the listener with its arguments (every -l given)."""
    return Process([sys.executable, "-X", "dev", "-W", "error",
                    str(LISTENER), *args])


def started(proc: Process, count: int) -> dict:
    """Wait for count addresses to be announced; return {label or
    address: address}."""
    proc.wait_stderr(r"Waiting for ")
    found = re.findall(STARTED, proc.stderr_text)
    if len(found) != count:
        raise AssertionError("expected %d addresses: %r"
                             % (count, proc.stderr_text))
    return {label or where: where for where, label in found}


def connect(where: str) -> socket.socket:
    """Connect to an address as the listener announced it."""
    address = lec.parse_address(where)
    return lec.open_connection(address, TIMEOUT)


def bound_unix(path: str, listening: bool) -> socket.socket:
    """Return a UNIX socket bound at path (listening, or left stale)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    if listening:
        sock.listen(4)
    return sock


class ListenParsingTest(unittest.TestCase):
    def test_a_label_never_splits_a_pipe_path_or_ipv6_address(self):
        self.assertEqual(lec.parse_listen("alerts=0.0.0.0:9997"),
                         ("alerts", ("0.0.0.0", 9997)))
        self.assertEqual(lec.parse_listen("v6=[::1]:9998"),
                         ("v6", ("::1", 9998)))
        self.assertEqual(lec.parse_listen("[::1]:9998"), ("", ("::1", 9998)))
        self.assertEqual(lec.parse_listen("9998"),
                         ("", (lec.LISTEN_ADDR, 9998)))
        if UNIX:
            found = lec.parse_listen("unix:/tmp/a=b.sock")
            self.assertEqual(found.label, "")
            self.assertEqual(found.address.path, "/tmp/a=b.sock")
            self.assertEqual(lec.parse_listen("u=unix:/run/ct.sock")
                             .address.path, "/run/ct.sock")
        # The pipe's own case (an error off Windows) sees the whole text.
        for text in ("\\\\.\\pipe\\a=b", "p=\\\\.\\pipe\\alerts"):
            with self.subTest(text), self.assertRaises(ValueError) as caught:
                lec.parse_listen(text)
            if os.name != "nt":
                self.assertIn("only on Windows", str(caught.exception))
        with self.assertRaisesRegex(ValueError, "empty label"):
            lec.parse_listen("=127.0.0.1:1")

    def test_help_states_the_socket_s_permissions_and_allow(self):
        proc = subprocess.run([sys.executable, str(LISTENER), "--help"],
                              env=dict(user_env(), COLUMNS="200"),
                              capture_output=True, timeout=TIMEOUT)
        text = " ".join(proc.stdout.decode().split())
        self.assertIn("--socket-mode MODE", text)
        self.assertIn("(default: 0666, any local user", text)
        self.assertIn("--allow does not apply to UNIX sockets", text)
        self.assertIn("LABEL=ADDR", text)

    @unittest.skipIf(os.name == "nt", "named pipes exist there")
    def test_a_named_pipe_off_windows_is_one_line_in_every_tool(self):
        pipe = "\\\\.\\pipe\\cybertrace"
        for script, args in ((LISTENER, ["-l", pipe]),
                             (LISTENER, ["-l", "alerts=" + pipe]),
                             (SENDER, ["-c", pipe, "-e", "x"]),
                             (SENDER, ["--check", "9998", pipe]),
                             (SENDER, ["--check", "9998", "-c", pipe]),
                             (STAND_IN, ["--input", pipe]),
                             (STAND_IN, ["--output", pipe]),
                             (STAND_IN, ["--alert-output", pipe])):
            with self.subTest(script=Path(script).name, args=args):
                proc = subprocess.run([sys.executable, str(script), *args],
                                      env=user_env(), capture_output=True,
                                      stdin=subprocess.DEVNULL,
                                      timeout=TIMEOUT)
                self.assertEqual(proc.returncode, 2, proc.stderr)
                err = proc.stderr.decode()
                self.assertEqual(len(err.splitlines()), 1, err)
                self.assertRegex(err, r"^%s: error: argument \S+: .*named "
                                 r"pipes \(\\\\\.\\pipe\\NAME\) exist only on "
                                 r"Windows\n$" % re.escape(Path(script).name))

    def test_a_label_or_address_given_twice_is_an_argument_error(self):
        for args, said in (
                (["-l", "a=127.0.0.1:0", "-l", "a=127.0.0.1:0"],
                 "label a given twice"),
                (["-l", "127.0.0.1:9", "-l", "x=127.0.0.1:9"],
                 "127.0.0.1:9 given twice")):
            with self.subTest(args):
                proc = subprocess.run(
                    [sys.executable, str(LISTENER), *args], env=user_env(),
                    capture_output=True, timeout=TIMEOUT)
                self.assertEqual(proc.returncode, 2)
                err = proc.stderr.decode()
                self.assertEqual(len(err.splitlines()), 1, err)
                self.assertIn(said, err)


@unittest.skipUnless(UNIX, "UNIX sockets")
class SeveralAddressesTest(unittest.TestCase):
    def setUp(self) -> None:
        folder = tempfile.TemporaryDirectory()
        self.addCleanup(folder.cleanup)
        self.dir = folder.name

    def test_three_addresses_label_every_event_under_concurrent_peers(self):
        path = os.path.join(self.dir, "ct.sock")
        with listener("-f", "json", "-l", "alerts=127.0.0.1:0",
                      "-l", "127.0.0.1:0", "-l", "unix:" + path) as proc:
            places = started(proc, 3)
            self.assertIn("alerts", places)
            self.assertIn("unix:" + path, places)
            # CyberTrace is told of the TCP addresses; the socket is local.
            self.assertRegex(proc.stderr_text, r"Waiting for CyberTrace "
                             r"\(OutputSettings > ConnectionString = [^)]*"
                             r"\), and programs here at %s; Ctrl\+C"
                             % re.escape("unix:" + path))
            # Each place's events name the listen value they must carry.
            peers = 3
            events = 200
            errors = []

            def send(listen: str, where: str, number: int) -> None:
                try:
                    with connect(where) as sock:
                        for index in range(events):
                            sock.sendall(b"listen=%s peer=%d n=%d\n" % (
                                listen.encode(), number, index))
                except OSError as exc:
                    errors.append(exc)
            threads = [threading.Thread(target=send, args=(listen, where, n))
                       for listen, where in places.items()
                       for n in range(peers)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(TIMEOUT)
            self.assertEqual(errors, [])
            total = events * peers * 3
            proc.wait_stdout(total)
            self.assertEqual(self.stop(proc), 0)
        records = [json.loads(line) for line in proc.out.splitlines()]
        self.assertEqual(len(records), total)
        for record in records:
            self.assertEqual(record["listen"], record["fields"]["listen"],
                             record)
        err = proc.stderr_text
        # The summary counts each address; connection lines name it.
        tcp = next(p for p in places if p.startswith("127.0.0.1:"))
        for shown in ("alerts (%s)" % places["alerts"], tcp,
                      "unix:" + path):
            self.assertRegex(err, r"\n  %s: %s, %d connections, 0 rejected"
                             % (re.escape(shown), lec.plural(
                                 events * peers, "event"), peers))
        self.assertRegex(err, r"Connection from 127\.0\.0\.1:\d+ at "
                         r"alerts \(%s\)\n" % re.escape(places["alerts"]))
        self.assertRegex(err, r"Closed 127\.0\.0\.1:\d+ at %s: %d events\n"
                         % (re.escape(tcp), events))
        self.assertFalse(os.path.exists(path))

    def stop(self, proc: Process) -> int:
        proc.signal(signal.SIGTERM)
        return proc.finish()

    def test_an_address_that_cannot_be_bound_is_named_and_nothing_starts(
            self):
        path = os.path.join(self.dir, "first.sock")
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen(1)
            taken = "127.0.0.1:%d" % busy.getsockname()[1]
            proc = subprocess.run(
                [sys.executable, "-X", "dev", "-W", "error", str(LISTENER),
                 "-l", "127.0.0.1:0", "-l", "unix:" + path,
                 "-l", "alerts=" + taken], env=user_env(),
                capture_output=True, timeout=TIMEOUT)
        self.assertEqual(proc.returncode, 1)
        err = proc.stderr.decode()
        self.assertEqual(err.splitlines(), [
            "listen_events_cybertrace.py: error: cannot listen on %s: "
            "Address already in use (-l alerts=...)" % taken], err)
        # The addresses opened before it are closed, the socket file gone.
        self.assertFalse(os.path.exists(path))

    def test_allow_limits_and_output_are_shared_by_all_addresses(self):
        path = os.path.join(self.dir, "events.log")
        with listener("-f", "raw", "-o", path, "--allow", "127.0.0.2/32",
                      "--max-per-host", "1", "-l", "127.0.0.1:0",
                      "-l", "b=127.0.0.1:0") as proc:
            places = started(proc, 2)
            first = next(p for p in places if p != "b")

            def connect_from(host: str, where: str) -> socket.socket:
                return socket.create_connection(
                    lec.parse_address(where), TIMEOUT,
                    source_address=(host, 0))
            for where in places.values():  # --allow, at each address
                with connect_from("127.0.0.1", where):
                    pass
            proc.wait_for(lambda: proc.stderr_text.count(
                "Rejected connection from 127.0.0.1:") == 2)
            with connect_from("127.0.0.2", places[first]) as one:
                one.sendall(b"one\n")
                proc.wait_stderr(r"Connection from 127\.0\.0\.2:\d+ at %s\n"
                                 % re.escape(first))
                # The host's one place is taken at the other address.
                with connect_from("127.0.0.2", places["b"]):
                    proc.wait_stderr(r"Rejected connection from 127\.0\.0\.2"
                                     r":\d+ at b \(\S+\): 1 connection from "
                                     r"127\.0\.0\.2 already")
            proc.wait_stderr(r"Closed 127\.0\.0\.2:\d+ at %s: 1 event\n"
                             % re.escape(first))
            with connect_from("127.0.0.2", places["b"]) as two:
                two.sendall(b"two\n")
            proc.wait_for(lambda: os.path.exists(path) and
                          os.path.getsize(path) == 8, what="both events")
            self.assertEqual(self.stop(proc), 0)
        with open(path, "rb") as file:
            self.assertEqual(file.read(), b"one\ntwo\n")  # one file
        err = proc.stderr_text
        self.assertIn("\n  %s: 1 event, 1 connection, 1 rejected\n" % first,
                      err)
        self.assertIn("\n  b (%s): 1 event, 1 connection, 2 rejected\n"
                      % places["b"], err)

    def test_allow_does_not_apply_to_a_unix_socket(self):
        path = os.path.join(self.dir, "ct.sock")
        with listener("-f", "raw", "--allow", "192.0.2.0/24",
                      "-l", "unix:" + path) as proc:
            proc.wait_stderr("--allow does not apply to UNIX sockets")
            started(proc, 1)
            self.assertIn("Waiting for programs here at unix:%s (CyberTrace's "
                          "outputs take ADDR:PORT or a pipe, not a UNIX "
                          "socket); Ctrl+C to stop" % path, proc.stderr_text)
            with connect("unix:" + path) as sock:
                sock.sendall(b"let in\n")
            proc.wait_stdout(1)
            self.assertEqual(self.stop(proc), 0)
        self.assertEqual(bytes(proc.out), b"let in\n")


@unittest.skipUnless(UNIX, "UNIX sockets")
class UnixSocketTest(unittest.TestCase):
    def setUp(self) -> None:
        folder = tempfile.TemporaryDirectory()
        self.addCleanup(folder.cleanup)
        self.path = os.path.join(folder.name, "ct.sock")
        self.dir = folder.name

    def stop(self, proc: Process, number: int = signal.SIGTERM) -> int:
        proc.signal(number)
        return proc.finish()

    def run_listener(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-X", "dev", "-W", "error", str(LISTENER),
             "-l", "unix:" + self.path, "-t", "0.5", *args],
            env=user_env(), capture_output=True, timeout=TIMEOUT)

    def test_a_stale_socket_file_is_replaced(self):
        bound_unix(self.path, listening=False).close()  # a killed listener
        self.assertTrue(stat.S_ISSOCK(os.lstat(self.path).st_mode))
        with listener("-f", "raw", "-l", "unix:" + self.path) as proc:
            started(proc, 1)
            with connect("unix:" + self.path) as sock:
                sock.sendall(b"after a stale file\n")
            proc.wait_stdout(1)
            self.assertEqual(self.stop(proc), 0)
        self.assertEqual(bytes(proc.out), b"after a stale file\n")

    def test_a_live_socket_is_a_one_line_error_and_keeps_working(self):
        with bound_unix(self.path, listening=True) as live:
            proc = self.run_listener()
            self.assertEqual(proc.returncode, 1)
            self.assertEqual(proc.stderr.decode().splitlines(), [
                "listen_events_cybertrace.py: error: cannot listen on "
                "unix:%s: another program listens on it" % self.path])
            with lec.open_connection(lec.UnixAddress(self.path), TIMEOUT):
                pass  # the other program still has its socket
            live.settimeout(TIMEOUT)
            live.accept()[0].close()  # the listener's probe
            live.accept()[0].close()  # ours

    def test_a_file_that_is_no_socket_is_left_alone(self):
        Path(self.path).write_bytes(b"mine")
        proc = self.run_listener()
        self.assertEqual(proc.returncode, 1)
        self.assertIn("the file there is not a socket", proc.stderr.decode())
        self.assertEqual(len(proc.stderr.splitlines()), 1)
        self.assertEqual(Path(self.path).read_bytes(), b"mine")

    def test_the_socket_is_removed_on_exit(self):
        for number in (signal.SIGTERM, signal.SIGINT):
            with self.subTest(signal.Signals(number).name), \
                    listener("-l", "unix:" + self.path) as proc:
                started(proc, 1)
                self.assertTrue(os.path.exists(self.path))
                self.assertEqual(self.stop(proc, number), 0)
                self.assertFalse(os.path.exists(self.path))
        proc = self.run_listener("-n", "1")  # -t ends it
        self.assertEqual(proc.returncode, 1)
        self.assertFalse(os.path.exists(self.path))

    def test_its_mode_is_0666_or_socket_mode_whatever_the_umask(self):
        for args, mode in (((), 0o666), (("--socket-mode", "0660"), 0o660),
                           (("--socket-mode", "600"), 0o600)):
            with self.subTest(args):
                umask = os.umask(0o077)
                try:
                    proc = listener("-l", "unix:" + self.path, *args)
                finally:
                    os.umask(umask)
                with proc:
                    proc.wait_stderr(r"\(mode %04o\)" % mode)
                    self.assertEqual(
                        stat.S_IMODE(os.stat(self.path).st_mode), mode)
                    self.assertEqual(self.stop(proc), 0)
        proc = self.run_listener("--socket-mode", "0999")
        self.assertEqual(proc.returncode, 2)
        self.assertIn("--socket-mode", proc.stderr.decode())

    @unittest.skipUnless(hasattr(socket, "SO_PEERCRED"), "SO_PEERCRED")
    def test_a_peer_is_named_by_the_path_and_its_process_id(self):
        with listener("-f", "json", "-l", "unix:" + self.path) as proc:
            started(proc, 1)
            sender = subprocess.Popen(
                [sys.executable, str(SENDER), "-c", "unix:" + self.path],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, env=user_env())
            try:
                sender.communicate(b"from a process\n", timeout=TIMEOUT)
            finally:
                if sender.poll() is None:
                    sender.kill()
                    sender.wait(TIMEOUT)
            self.assertEqual(sender.returncode, 0)
            peer = "unix:%s (pid %d)" % (self.path, sender.pid)
            proc.wait_stderr(r"Connection from %s\n" % re.escape(peer))
            proc.wait_stderr(r"Closed %s: 1 event\n" % re.escape(peer))
            proc.wait_stdout(1)
            self.assertEqual(self.stop(proc), 0)
        record = json.loads(proc.out)
        self.assertEqual(record["peer"], peer)
        self.assertEqual(record["listen"], "unix:" + self.path)

    def test_the_sender_over_unix_reaches_the_listener_byte_exact(self):
        rng = random.Random(21)
        lines = []
        for number in range(1000):
            size = rng.choice((0, 1, 40, 300, 4000, 20000))  # under 64 KiB
            text = "".join(rng.choice("abc =|\"\\é€\t") for _ in range(size))
            lines.append(("%d %s" % (number, text)).encode())
        data = b"\n".join(lines) + b"\n"
        source = Path(self.dir, "events.txt")
        source.write_bytes(data)
        with listener("-f", "raw", "-l", "unix:" + self.path) as proc:
            started(proc, 1)
            sent = run_sender("-c", "unix:" + self.path, str(source))
            self.assertEqual(sent.returncode, 0, sent.stderr)
            self.assertIn(b"to unix:" + self.path.encode(), sent.stderr)
            proc.wait_for(lambda: len(proc.out) >= len(data), TIMEOUT,
                          "every byte")
            self.assertEqual(self.stop(proc), 0)
        self.assertEqual(bytes(proc.out), data)

    def test_the_stand_in_takes_and_delivers_over_unix(self):
        detections = os.path.join(self.dir, "out.sock")
        alerts = os.path.join(self.dir, "alerts.sock")
        events = os.path.join(self.dir, "in.sock")
        with listener("-f", "json", "-l", "unix:" + detections,
                      "-l", "alerts=unix:" + alerts) as proc:
            started(proc, 2)
            with Process([sys.executable, "-X", "dev", "-W", "error",
                          str(STAND_IN), "--input", "unix:" + events,
                          "--output", "unix:" + detections,
                          "--alert-output", "unix:" + alerts,
                          "--detect-all"]) as stand_in:
                stand_in.wait_stderr(r"Listening on unix:")
                sent = run_sender("-c", "unix:" + events, "--test-events")
                self.assertEqual(sent.returncode, 0, sent.stderr)
                proc.wait_stdout(18)  # 17 detections and the start alert
                # Reply-back: the answers come back over the same socket.
                answered = run_sender("-c", "unix:" + events, "--reply-back",
                                      "--test-events")
                self.assertEqual(answered.returncode, 0, answered.stderr)
                self.assertIn(b"17 events answered: 17 detections",
                              answered.stderr)
                stand_in.signal(signal.SIGTERM)
                self.assertEqual(stand_in.finish(), 0)
            self.assertFalse(os.path.exists(events))
            self.assertEqual(self.stop(proc), 0)
        records = [json.loads(line) for line in proc.out.splitlines()]
        where = {}
        for record in records:
            kind = "alert" if "alert" in record["fields"] else "detection"
            where.setdefault(kind, set()).add(record["listen"])
        self.assertEqual(where, {"alert": {"alerts"},
                                 "detection": {"unix:" + detections}})
        self.assertEqual(len(records), 18)


if __name__ == "__main__":
    unittest.main()
