"""The listener, driven as a user drives it: command line, real sockets."""

from __future__ import annotations

import json
import os
import pty
import random
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unittest
from collections import Counter

from support import (TUTORIAL_EVENTS, LISTENER, TIMEOUT, Listener, Process,
                     queue_peers, reference_framing, reset, user_env)

import listen_events_cybertrace as lec


def received(events) -> bytes:
    return "".join("Received:\n%s\n" % e for e in events).encode()


class TutorialOutputTest(unittest.TestCase):
    def test_tutorial_events_print_exactly_as_the_tutorial_shows(self):
        with Listener() as listener:
            with listener.connect() as sock:
                sock.sendall("".join(e + "\n" for e in TUTORIAL_EVENTS)
                             .encode())
                port = sock.getsockname()[1]
            listener.wait_stdout(8)
            listener.wait_stderr("Closed")
            self.assertEqual(listener.stop(), 0)
            self.assertEqual(bytes(listener.out), received(TUTORIAL_EVENTS))
            lines = listener.stderr_text.splitlines()
            self.assertEqual(lines[0], "Starting on 127.0.0.1:%d"
                             % listener.address[1])
            self.assertEqual(lines[1], "Waiting for CyberTrace (OutputSettings"
                             " > ConnectionString = 127.0.0.1:%d); Ctrl+C to "
                             "stop" % listener.address[1])
            self.assertEqual(lines[2], "Connection from 127.0.0.1:%d" % port)
            self.assertEqual(lines[3], "Closed 127.0.0.1:%d: 4 events" % port)
            self.assertEqual(lines[-1], "Stopped: 4 events, %s received, "
                             "1 connection, 0 rejected" % lec.format_bytes(
                                 sum(len(e) + 1 for e in TUTORIAL_EVENTS)))

    def test_events_reach_a_pipe_while_the_peer_stays_connected(self):
        with Listener("-f", "raw") as listener, listener.connect() as sock:
            for number in range(3):
                sock.sendall(b"event %d\n" % number)
                listener.wait_stdout(number + 1)
            self.assertEqual(bytes(listener.out),
                             b"event 0\nevent 1\nevent 2\n")


class FramingTest(unittest.TestCase):
    def test_trailing_event_without_newline_is_emitted(self):
        with Listener("-f", "raw") as listener:
            listener.send(b"first\nlast without newline")
            listener.wait_stdout(2)
            self.assertEqual(bytes(listener.out),
                             b"first\nlast without newline\n")

    def test_cr_before_newline_is_dropped_and_a_lone_cr_kept(self):
        with Listener("-f", "raw") as listener:
            listener.send(b"one\r\ntw\ro\r", b"\nthree\r\n")
            listener.wait_stdout(3)
            self.assertEqual(bytes(listener.out), b"one\ntw\ro\nthree\n")

    def test_invalid_utf8_is_escaped_in_text_and_json_raw_in_raw(self):
        payload = b"bad \xff\xfe byte \xe2\x82 and \xe2\x82\xac\n"
        expected = {
            "text": b"Received:\nbad \\xff\\xfe byte \\xe2\\x82 and "
                    b"\xe2\x82\xac\n",
            "raw": payload,
        }
        for fmt in ("text", "raw", "json"):
            with self.subTest(fmt), Listener("-f", fmt) as listener:
                listener.send(payload)
                listener.wait_stdout(1)
                if fmt == "json":
                    # Not "\\xff", which a literal backslash could write:
                    # \udcff, which no text holds (surrogateescape).
                    self.assertIn(b"bad \\udcff\\udcfe byte \\udce2\\udc82 "
                                  b"and \xe2\x82\xac", bytes(listener.out))
                    record = json.loads(listener.out)
                    self.assertEqual(record["event"].encode(
                        "utf-8", "surrogateescape"), payload[:-1])
                else:
                    self.assertEqual(bytes(listener.out), expected[fmt])
                listener.send(b"still alive\n")
                listener.wait_stdout(2)

    def test_overlong_event_is_split_without_losing_a_byte(self):
        event = bytes(random.Random(1).choice(b"abcdef") for _ in range(95))
        with Listener("-f", "raw", "--max-event-bytes", "10") as listener:
            listener.send(event[:33], event[33:61], event[61:] + b"\nok\n")
            listener.wait_stdout(11)
            pieces = bytes(listener.out).split(b"\n")[:-1]
            self.assertEqual(pieces[:10], [event[i:i + 10]
                                           for i in range(0, 95, 10)])
            self.assertEqual(pieces[10], b"ok")
            listener.wait_stderr("longer than 10 bytes")
            self.assertEqual(listener.stderr_text.count("longer than"), 1)

    def test_a_64_mib_event_is_taken_in_bounded_memory(self):
        with Listener("-f", "raw", "-o", os.devnull) as listener:
            chunk = b"x" * (1 << 20)
            with listener.connect() as sock:
                for _ in range(64):
                    sock.sendall(chunk)
                sock.shutdown(socket.SHUT_WR)
                # The listener closes its end once it has read everything.
                self.assertEqual(sock.recv(1), b"")
            self.assertEqual(listener.stop(), 0)
            self.assertIn("Stopped: 64 events, 64.0 MiB received",
                          listener.stderr_text)


class ConcurrencyTest(unittest.TestCase):
    def test_100_connections_cut_at_random_bytes_each_event_once_whole(self):
        rng = random.Random(7)
        streams = []
        for conn in range(100):
            events = [("conn=%d seq=%d %s" % (conn, seq, "x" * rng.randrange(
                0, 300))).encode() for seq in range(20)]
            streams.append(events)
        with Listener("-f", "raw", "--max-connections", "200") as listener:
            sockets = [listener.connect() for _ in streams]
            try:
                pending = []
                for sock, events in zip(sockets, streams):
                    data = b"".join(e + b"\n" for e in events)
                    cuts = sorted(rng.sample(range(1, len(data)), 10))
                    pieces = [data[a:b] for a, b in
                              zip([0] + cuts, cuts + [len(data)])]
                    pending.append([sock, pieces])
                while pending:
                    item = rng.choice(pending)
                    item[0].sendall(item[1].pop(0))
                    if not item[1]:
                        pending.remove(item)
            finally:
                for sock in sockets:
                    sock.close()
            total = sum(map(len, streams))
            listener.wait_stdout(total)
            self.assertEqual(listener.stop(), 0)
            got = Counter(bytes(listener.out).split(b"\n")[:-1])
            want = Counter(e for events in streams for e in events)
            self.assertEqual(got, want)

    def test_an_idle_peer_does_not_delay_another(self):
        with Listener("-f", "raw") as listener, listener.connect() as idle:
            idle.sendall(b"half an ev")
            listener.send(b"from the second peer\n")
            listener.wait_stdout(1)
            self.assertEqual(bytes(listener.out), b"from the second peer\n")

    def test_a_reset_peer_does_not_stop_the_listener(self):
        with Listener("-f", "raw") as listener:
            sock = listener.connect()
            sock.sendall(b"before reset\npartial")
            listener.wait_stdout(1)
            reset(sock)
            listener.wait_stdout(2)
            listener.send(b"after reset\n")
            listener.wait_stdout(3)
            self.assertEqual(listener.stop(), 0)
            self.assertEqual(bytes(listener.out),
                             b"before reset\npartial\nafter reset\n")

    def test_max_connections_makes_the_next_peer_wait_not_fail(self):
        with Listener("-f", "raw", "--max-connections", "1") as listener:
            first = listener.connect()
            listener.wait_stderr("Connection from")
            with listener.connect() as second:
                second.sendall(b"waited\n")
                first.sendall(b"first\n")
                listener.wait_stdout(1)
                first.close()
                listener.wait_stdout(2)
            self.assertEqual(bytes(listener.out), b"first\nwaited\n")
            listener.wait_stderr(r"warning: 1 connection open "
                                 r"\(--max-connections\)")

    def test_idle_timeout_closes_a_silent_peer_keeping_its_partial_event(self):
        with Listener("-f", "raw", "--idle-timeout", "0.3") as listener, \
                listener.connect() as sock:
            sock.sendall(b"partial")
            sock.settimeout(TIMEOUT)
            self.assertEqual(sock.recv(1), b"")
            listener.wait_stdout(1)
            self.assertEqual(bytes(listener.out), b"partial\n")
            listener.wait_stderr(r"Closed 127\.0\.0\.1:%d \(idle for 0\.3 s\)"
                                 r": 1 event\n" % sock.getsockname()[1])


class FormatTest(unittest.TestCase):
    def test_json_lines_carry_time_peer_event_and_fields(self):
        with Listener("-f", "json") as listener, listener.connect() as sock:
            sock.sendall("".join(e + "\n" for e in TUTORIAL_EVENTS[:2])
                         .encode()
                         + b"Apr 16 09:05:41 alert=KL_ALERT_UpdatedFeed "
                         b"feed=Phishing_URL_Data_Feed.json records=200473\n")
            listener.wait_stdout(3)
            records = [json.loads(line) for line in
                       bytes(listener.out).splitlines()]
            port = sock.getsockname()[1]
        self.assertEqual([r["event"] for r in records[:2]],
                         TUTORIAL_EVENTS[:2])
        for record in records:
            self.assertEqual(record["peer"], "127.0.0.1:%d" % port)
            self.assertRegex(record["time"],
                             r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
        first = records[0]["fields"]
        self.assertEqual(first["category"], "KL_Malicious_Hash_MD5")
        self.assertEqual(first["first_seen"], "10.07.2015 23:53")
        self.assertNotIn("-", first)
        second = records[1]["fields"]
        self.assertEqual(second["category"], ["KL_IP_Reputation", "test"])
        self.assertEqual(second["ip"], ["192.0.2.1", "192.0.2.1"])
        self.assertEqual(records[2]["fields"], {
            "alert": "KL_ALERT_UpdatedFeed",
            "feed": "Phishing_URL_Data_Feed.json", "records": "200473"})

    def test_json_fields_with_pipes_and_no_fields(self):
        with Listener("-f", "json") as listener:
            listener.send(b"Category=KL_Malicious_URL|MatchedIndicator="
                          b"http://fakess123.nu|src=198.51.100.7\n"
                          b"no fields here\n")
            listener.wait_stdout(2)
            records = [json.loads(line) for line in
                       bytes(listener.out).splitlines()]
        self.assertEqual(records[0]["fields"], {
            "Category": "KL_Malicious_URL",
            "MatchedIndicator": "http://fakess123.nu",
            "src": "198.51.100.7"})
        self.assertEqual(records[1]["fields"], {})
        self.assertEqual(records[1]["event"], "no fields here")

    def test_terminal_sees_control_characters_escaped(self):
        event = b"evil \x1b]0;owned\x07 \x1b[2J\x9b title\xc2\x9b\n"
        for fmt, want in (("raw", b"evil \\x1b]0;owned\\x07 \\x1b[2J\\x9b "
                                  b"title\\x9b"),
                          ("text", b"evil \\x1b]0;owned\\x07 \\x1b[2J\\x9b "
                                   b"title\\x9b"),
                          ("json", b'"evil \\u001b]0;owned\\u0007 '
                                   b'\\u001b[2J\\udc9b title\\u009b"')):
            with self.subTest(fmt):
                out = self.run_on_terminal(fmt, event)
                self.assertIn(want, out)
                self.assertNotIn(b"\x1b", out)
                self.assertNotIn(b"\x07", out)
                self.assertNotIn(b"\xc2\x9b", out)

    def run_on_terminal(self, fmt: str, event: bytes) -> bytes:
        primary, secondary = pty.openpty()
        try:
            with Listener("-f", fmt, stdout=secondary) as listener:
                os.close(secondary)
                secondary = None
                listener.send(event)
                out = b""
                deadline = time.monotonic() + TIMEOUT
                while b"title" not in out and time.monotonic() < deadline:
                    out += os.read(primary, 65536)
                self.assertEqual(listener.stop(), 0)
                return out
        finally:
            os.close(primary)
            if secondary is not None:
                os.close(secondary)

    def test_a_pipe_gets_control_characters_as_they_are(self):
        with Listener("-f", "raw") as listener:
            listener.send(b"a\x1b[2Jb\x07\n")
            listener.wait_stdout(1)
            self.assertEqual(bytes(listener.out), b"a\x1b[2Jb\x07\n")


class StopTest(unittest.TestCase):
    def test_count_stops_after_exactly_n_events(self):
        with Listener("-f", "raw", "-n", "2") as listener:
            listener.send(b"one\ntwo\nthree\nfour\n")
            self.assertEqual(listener.finish(), 0)
            self.assertEqual(bytes(listener.out), b"one\ntwo\n")
            self.assertRegex(listener.stderr_text,
                             r"Stopped: 2 events \(2 more received, not "
                             r"written\), 19 bytes received")

    def test_count_reports_a_trailing_event_not_written(self):
        with Listener("-f", "raw", "-n", "1") as listener:
            listener.send(b"one")
            self.assertEqual(listener.finish(), 0)
            self.assertEqual(bytes(listener.out), b"one\n")
            self.assertNotIn("more received", listener.stderr_text)
        with Listener("-f", "raw", "-n", "1") as listener, \
                listener.connect() as sock:
            sock.sendall(b"one\ntrailing")
            self.assertEqual(listener.finish(), 0)
            self.assertIn("Stopped: 1 event (1 more received, not written)",
                          listener.stderr_text)

    def test_timeout_exits_0_or_1_when_count_is_not_reached(self):
        with Listener("-t", "0.2") as listener:
            self.assertEqual(listener.finish(), 0)
        with Listener("-t", "0.2", "-n", "5", "-f", "raw") as listener:
            listener.send(b"only one\n")
            self.assertEqual(listener.finish(), 1)
            self.assertEqual(bytes(listener.out), b"only one\n")
            self.assertIn("received 1 of 5 events", listener.stderr_text)

    def test_signal_drains_accepted_connections_and_buffered_bytes(self):
        for number in (signal.SIGTERM, signal.SIGINT):
            with self.subTest(signal=number), \
                    Listener("-f", "raw") as listener:
                sockets = []
                try:
                    served = listener.connect()
                    served.sendall(b"served\n")
                    listener.wait_stdout(1)
                    listener.signal(signal.SIGSTOP)
                    served.sendall(b"buffered\nbuffered partial")
                    sockets = queue_peers(listener, 5)
                    listener.signal(number)
                    listener.signal(signal.SIGCONT)
                    self.assertEqual(listener.finish(), 0)
                finally:
                    served.close()
                    for sock in sockets:
                        sock.close()
                lines = bytes(listener.out).split(b"\n")
                self.assertEqual(lines[0], b"served")
                self.assertEqual(sorted(lines[1:-1]), sorted(
                    [b"buffered", b"buffered partial"] +
                    [b"queued %d" % i for i in range(5)] +
                    [b"queued partial %d" % i for i in range(5)]))
                self.assertNotIn("Traceback", listener.stderr_text)
                self.assertIn("Stopped: 13 events", listener.stderr_text)

    def test_closed_stdout_is_an_error_with_what_was_not_written(self):
        # A reader that went away (| consumer died) must not look like a
        # normal stop: systemd's Restart=on-failure needs the exit status.
        reader = subprocess.Popen(["head", "-n", "1"], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE)
        try:
            with Listener("-f", "raw", stdout=reader.stdin) as listener:
                reader.stdin.close()
                with listener.connect() as sock:
                    sock.sendall(b"first\n")
                    # head writes its line whole; never block for ever.
                    ready, _, _ = select.select([reader.stdout], [], [],
                                                TIMEOUT)
                    self.assertTrue(ready, "head printed nothing")
                    self.assertEqual(reader.stdout.readline(), b"first\n")
                    reader.wait(TIMEOUT)
                    # The listener learns of the closed pipe on its next
                    # write: keep feeding it until it exits.
                    deadline = time.monotonic() + TIMEOUT
                    while listener.proc.poll() is None and \
                            time.monotonic() < deadline:
                        try:
                            sock.sendall(b"more\n" * 1000)
                        except OSError:
                            break
                        time.sleep(0.01)
                self.assertEqual(listener.finish(), 1)
                err = listener.stderr_text
                self.assertNotIn("Traceback", err)
                # It may have ended before "more" came (head exited), or
                # before it read what came.
                lost = (r"([\d,]+ more received, not written|[\d.]+ \w+ "
                        r"more sent by peers, never read)")
                self.assertRegex(err, r"Stopped: [\d,]+ events?( \(%s(; %s)*"
                                      r"\))?," % (lost, lost))
                self.assertRegex(err.splitlines()[-1], r"error: cannot "
                                 r"write to stdout: Broken pipe$")
        finally:
            reader.stdout.close()
            reader.wait(TIMEOUT)


class OutputFileTest(unittest.TestCase):
    def test_output_appends_and_sighup_reopens_after_rotation(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "events.log")
            with open(path, "wb") as f:
                f.write(b"old\n")
            with Listener("-f", "raw", "-o", path) as listener:
                listener.send(b"one\n")
                listener.wait_for(lambda: os.path.getsize(path) == 8)
                os.rename(path, path + ".1")
                listener.signal(signal.SIGHUP)
                listener.wait_stderr("Reopened %s\n" % re.escape(path))
                self.assertTrue(os.path.exists(path))
                listener.send(b"two\n")
                listener.wait_for(lambda: os.path.getsize(path) == 4)
                self.assertEqual(listener.stop(), 0)
                self.assertEqual(bytes(listener.out), b"")
            with open(path + ".1", "rb") as f:
                self.assertEqual(f.read(), b"old\none\n")
            with open(path, "rb") as f:
                self.assertEqual(f.read(), b"two\n")

    def test_files_are_created_for_owner_and_group_only(self):
        # Whatever the umask (022 here, 0 in the last case), as asked.
        with tempfile.TemporaryDirectory() as tmp:
            for name, args, mode in (("default.log", (), 0o640),
                                     ("asked.log", ("--file-mode", "0600"),
                                      0o600),
                                     ("wide.log", ("--file-mode", "664"),
                                      0o664)):
                with self.subTest(name):
                    path = os.path.join(tmp, name)
                    with Listener("-f", "raw", "-o", path, *args) \
                            as listener:
                        listener.send(b"one\n")
                        listener.wait_for(lambda: os.path.exists(path) and
                                          os.path.getsize(path) == 4)
                        self.assertEqual(os.stat(path).st_mode & 0o777, mode)
                        # Rotated away, the new file is created the same.
                        os.rename(path, path + ".1")
                        listener.signal(signal.SIGHUP)
                        listener.wait_stderr("Reopened")
                        self.assertEqual(os.stat(path).st_mode & 0o777, mode)
                        self.assertEqual(listener.stop(), 0)
            # A file that exists keeps its mode.
            path = os.path.join(tmp, "kept.log")
            with open(path, "wb"):
                pass
            os.chmod(path, 0o644)
            with Listener("-o", path) as listener:
                self.assertEqual(listener.stop(), 0)
            self.assertEqual(os.stat(path).st_mode & 0o777, 0o644)

    def test_full_disk_is_one_clear_error(self):
        with Listener("-o", "/dev/full") as listener:
            listener.send(b"lost?\n")
            self.assertEqual(listener.finish(), 1)
            last = listener.stderr_text.strip().splitlines()[-1]
            self.assertRegex(last, r"error: cannot write to /dev/full: "
                                   r"No space left on device")
            self.assertNotIn("Traceback", listener.stderr_text)


class UserErrorTest(unittest.TestCase):
    def run_listener(self, *args: str) -> tuple:
        proc = subprocess.run([sys.executable, str(LISTENER), *args],
                              capture_output=True, text=True, timeout=TIMEOUT,
                              env=user_env())
        return proc.returncode, proc.stdout, proc.stderr

    def assert_one_line_error(self, status: int, args: tuple, pattern: str):
        code, out, err = self.run_listener(*args)
        self.assertEqual(code, status, err)
        self.assertEqual(out, "")
        self.assertNotIn("Traceback", err)
        self.assertEqual(len(err.splitlines()), 1, err)
        self.assertRegex(err, pattern)
        return err

    def test_port_in_use(self):
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            port = busy.getsockname()[1]
            err = self.assert_one_line_error(
                1, ("-l", "127.0.0.1:%d" % port, "-t", "5"),
                "error: cannot listen on 127.0.0.1:%d: Address already in use"
                % port)
            self.assertEqual(len(err.strip().splitlines()), 1)

    def test_address_not_available(self):
        self.assert_one_line_error(1, ("-l", "192.0.2.105:9998", "-t", "5"),
                                   "error: cannot listen on 192.0.2.105:9998:"
                                   " Cannot assign requested address")

    def test_unknown_host(self):
        self.assert_one_line_error(1, ("-l", "no-such-host.invalid:0"),
                                   "error: cannot resolve "
                                   "no-such-host.invalid")

    def test_unwritable_output(self):
        self.assert_one_line_error(1, ("-o", "/nonexistent/dir/x.log"),
                                   "error: cannot open /nonexistent/dir/x.log:"
                                   " No such file or directory")
        with tempfile.TemporaryDirectory() as tmp:
            self.assert_one_line_error(1, ("-o", tmp),
                                       "error: cannot open .*: Is a directory")

    def test_permission_denied(self):
        """A port below 1024 and a read-only file, as an unprivileged user."""
        kwargs, python = {}, sys.executable
        if os.geteuid() == 0:
            # Root may do both: run as nobody, with a Python nobody can run.
            python = "/usr/bin/python3"
            if not os.access(python, os.X_OK):
                self.skipTest("no system python3 to run as nobody")
            kwargs = {"user": 65534, "group": 65534, "extra_groups": []}
        with tempfile.TemporaryDirectory() as tmp:
            os.chmod(tmp, 0o755)
            script = shutil.copy(LISTENER, tmp)
            readonly = os.path.join(tmp, "readonly.log")
            with open(readonly, "w"):
                pass
            os.chmod(readonly, 0o444)
            for args, pattern in (
                    (["-l", "127.0.0.1:80"], "error: cannot listen on "
                     "127.0.0.1:80: Permission denied"),
                    (["-o", readonly], "error: cannot open .*readonly.log: "
                     "Permission denied")):
                with self.subTest(args=args):
                    proc = subprocess.run([python, script, "-t", "5", *args],
                                          capture_output=True, text=True,
                                          timeout=TIMEOUT, env=user_env(),
                                          **kwargs)
                    self.assertEqual(proc.returncode, 1, proc.stderr)
                    self.assertNotIn("Traceback", proc.stderr)
                    self.assertEqual(len(proc.stderr.splitlines()), 1)
                    self.assertRegex(proc.stderr, pattern)

    def test_bad_arguments_exit_2(self):
        for args in (("-l", "nothing"), ("-l", "127.0.0.1:70000"),
                     ("-l", "::1:80"), ("-f", "xml"), ("-n", "0"),
                     ("--allow", "10.0.0.0/33"), ("--idle-timeout", "-1"),
                     ("--max-event-bytes", "lots")):
            with self.subTest(args=args):
                self.assert_one_line_error(2, args, "error: argument")

    def test_named_pipe_is_windows_only(self):
        """CyberTrace's \\\\.\\pipe\\NAME form says why it fails here."""
        self.assert_one_line_error(2, ("-l", r"\\.\pipe\cybertrace"),
                                   "named pipes .* exist only on Windows")

    def test_version_and_help(self):
        code, out, _ = self.run_listener("--version")
        self.assertEqual(code, 0)
        self.assertRegex(out, r"\d+\.\d+\.\d+")
        code, out, _ = self.run_listener("--help")
        self.assertEqual(code, 0)
        for option in ("--listen", "--format", "--output", "--allow",
                       "--max-connections", "--idle-timeout",
                       "--max-event-bytes", "--count", "--timeout",
                       "--quiet"):
            self.assertIn(option, out)


class AddressTest(unittest.TestCase):
    def test_connection_string_forms(self):
        self.assertEqual(lec.parse_address("192.0.2.105:9998"),
                         ("192.0.2.105", 9998))
        self.assertEqual(lec.parse_address("[::1]:9998"), ("::1", 9998))
        self.assertEqual(lec.parse_address("9000"), ("127.0.0.1", 9000))
        self.assertEqual(lec.parse_address("localhost:0"), ("localhost", 0))

    def test_host_name_and_bare_port(self):
        with Listener(listen="localhost:0") as listener:
            self.assertIn(listener.address[0], ("127.0.0.1", "::1"))
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        with Listener(listen=str(port)) as listener:
            self.assertEqual(listener.address, ("127.0.0.1", port))

    @unittest.skipUnless(socket.has_ipv6, "no IPv6")
    def test_ipv6_in_brackets(self):
        try:
            with socket.socket(socket.AF_INET6) as probe:
                probe.bind(("::1", 0))
        except OSError:
            self.skipTest("no IPv6 loopback")
        with Listener("-f", "json", listen="[::1]:0") as listener:
            self.assertIn("Starting on [::1]:", listener.stderr_text)
            with socket.create_connection(("::1", listener.address[1]),
                                          timeout=TIMEOUT) as sock:
                sock.sendall(b"v6=yes\n")
                port = sock.getsockname()[1]
                listener.wait_stdout(1)
            self.assertEqual(json.loads(listener.out)["peer"],
                             "[::1]:%d" % port)
            listener.wait_stderr(r"Connection from \[::1\]:%d\n" % port)
            listener.wait_stderr(r"Closed \[::1\]:%d: 1 event\n" % port)

    def test_allow_rejects_and_counts_other_networks(self):
        # Loopback networks without 127.0.0.1: a network no local program
        # could match would be an argument error.
        with Listener("-f", "raw", "--allow", "127.0.0.2/32",
                      "--allow", "127.1.0.0/16") as listener:
            with listener.connect() as sock:
                sock.settimeout(TIMEOUT)
                port = sock.getsockname()[1]
                try:
                    self.assertEqual(sock.recv(1), b"")
                except ConnectionResetError:
                    pass
            listener.wait_stderr(r"Rejected connection from 127\.0\.0\.1:%d\n"
                                 % port)
            self.assertEqual(listener.stop(), 0)
            self.assertIn("1 rejected", listener.stderr_text)
        with Listener("-f", "raw", "--allow", "127.0.0.0/8") as listener:
            listener.send(b"allowed\n")
            listener.wait_stdout(1)

    def test_quiet_prints_no_status(self):
        with Process([sys.executable, str(LISTENER), "-q", "-l", "127.0.0.1:0",
                      "-t", "0.2"]) as proc:
            self.assertEqual(proc.finish(), 0)
            self.assertEqual(proc.stderr_text, "")


class HelperTest(unittest.TestCase):
    """The formatting helpers both scripts use for people."""

    def test_format_count_plural_and_bytes(self):
        self.assertEqual(lec.format_count(1204), "1,204")
        self.assertEqual(lec.format_count(0), "0")
        self.assertEqual(lec.plural(1, "event"), "1 event")
        self.assertEqual(lec.plural(0, "event"), "0 events")
        self.assertEqual(lec.plural(1204, "event"), "1,204 events")
        self.assertEqual(lec.plural(2, "entry", "entries"), "2 entries")
        self.assertEqual(lec.format_bytes(1), "1 byte")
        self.assertEqual(lec.format_bytes(1023), "1,023 bytes")
        self.assertEqual(lec.format_bytes(1024), "1.0 KiB")
        self.assertEqual(lec.format_bytes(542924), "530.2 KiB")
        self.assertEqual(lec.format_bytes((1 << 20) - 1), "1.0 MiB")
        self.assertEqual(lec.format_bytes(3 << 29), "1.5 GiB")

    def test_format_peer_speaks_connection_string(self):
        self.assertEqual(lec.format_peer(("127.0.0.1", 41882)),
                         "127.0.0.1:41882")
        self.assertEqual(lec.format_peer(("::1", 41882, 0, 0)),
                         "[::1]:41882")
        self.assertEqual(lec.format_peer(("::ffff:192.0.2.7", 5, 0, 0)),
                         "192.0.2.7:5")

    def test_a_host_is_an_ipv4_address_or_an_ipv6_64(self):
        # One IPv6 machine commonly holds a whole /64: counted by address,
        # its peers could each stay under --max-per-host (issue 25).
        key = lec.host_key
        self.assertEqual(key("2001:db8:1::5"), key("2001:db8:1::6:7"))
        self.assertEqual(key("2001:db8:1::5"), "2001:db8:1::/64")
        self.assertNotEqual(key("2001:db8:1::5"), key("2001:db8:1:2::5"))
        self.assertNotEqual(key("192.0.2.5"), key("192.0.2.6"))
        # An IPv4 peer of a dual-stack socket is its IPv4 address, not
        # one of a /64 that every IPv4 peer shares.
        self.assertEqual(key("::ffff:192.0.2.5"), "192.0.2.5")
        self.assertEqual(key("192.0.2.5", (24, 48)), "192.0.2.0/24")
        self.assertEqual(key("2001:db8:1:2::5", (24, 48)),
                         key("2001:db8:1::", (24, 48)))


class FramerTest(unittest.TestCase):
    """The framing shared with the sender, fed byte by byte and at once."""

    def test_random_streams_match_the_reference_framing(self):
        rng = random.Random(3)
        alphabet = b"ab\r\n\x00\xff"
        for _ in range(300):
            data = bytes(rng.choice(alphabet)
                         for _ in range(rng.randrange(60)))
            size = rng.randrange(1, 8)
            framer = lec.EventFramer(size)
            out = b""
            pos = 0
            while pos < len(data):
                step = rng.randrange(1, 6)
                out += framer.feed(data[pos:pos + step])
                pos += step
            out += framer.close()
            self.assertEqual(out.split(b"\n")[:-1] if out else [],
                             reference_framing(data, size), data)

    def test_json_plans_keep_percent_signs_in_peer_keys_and_values(self):
        block = b"- k%s=%d x=%%\n" * 3
        format_json = lec.JsonFormatter().format
        for _ in range(3):  # the first batch builds the plan, later use it
            out = format_json(block, lec.split_lines(block),
                              "[fe80::1%eth0]:5", 0.0, False)
            for line in out.splitlines():
                record = json.loads(line)
                self.assertEqual(record["peer"], "[fe80::1%eth0]:5")
                self.assertEqual(record["event"], "- k%s=%d x=%%")
                self.assertEqual(record["fields"], {"k%s": "%d", "x": "%%"})

    def test_json_values_end_without_white_space(self):
        cases = [(b"trail=1 \n", {"trail": "1"}),
                 (b"k=a  b   c=d\n", {"k": "a  b", "c": "d"}),
                 (b"- a=1 |b=2  \n", {"a": "1", "b": "2"}),
                 (b"- a=  b=x\n", {"a": "", "b": "x"})]
        for line, fields in cases:
            self.assertEqual(lec.parse_fields(line[:-1].decode()), fields)
        # The compiled plans too: one is built from a template's clean event,
        # then meets events of the same keys whose values end with spaces.
        format_json = lec.JsonFormatter().format
        for clean, spaced, fields in (
                (b"- a=1 b=2\n", b"- a=1   b=2 \n", {"a": "1", "b": "2"}),
                (b"k=a c=d\n", b"k=a  b   c=d\n", {"k": "a  b", "c": "d"}),
                (b"x=1|y=2\n", b"x=1 |y=2\n", {"x": "1", "y": "2"})):
            for block in (clean, clean, spaced + clean, spaced):
                out = format_json(block, lec.split_lines(block), "p",
                                  0.0, False)
                for line, record in zip(lec.split_lines(block),
                                        map(json.loads, out.splitlines())):
                    self.assertEqual(record["event"], line[:-1].decode())
                    if line == spaced:
                        self.assertEqual(record["fields"], fields, line)
                    else:
                        self.assertEqual(record["fields"], lec.parse_fields(
                            record["event"]), line)

    def test_json_values_are_trimmed_by_the_listener(self):
        with Listener("-f", "json") as listener:
            for _ in range(3):  # the later batches meet a compiled plan
                listener.send(b"- trail=1 next=x \n- trail=1  next=x\n")
            listener.wait_stdout(6)
            records = [json.loads(line) for line in
                       bytes(listener.out).splitlines()]
        self.assertEqual([r["event"] for r in records],
                         ["- trail=1 next=x ", "- trail=1  next=x"] * 3)
        for record in records:
            self.assertEqual(record["fields"], {"trail": "1", "next": "x"})

    def test_parse_fields(self):
        self.assertEqual(lec.parse_fields("x a=1 b=2 3 a=4|c=5=6"),
                         {"a": ["1", "4"], "b": "2 3", "c": "5=6"})


if __name__ == "__main__":
    unittest.main()
