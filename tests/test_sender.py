"""The sender, driven from its command line against real sockets."""

from __future__ import annotations

import re
import socket
import tempfile
import threading
import time
import unittest

from fake_cybertrace import INDICATORS, read_flags
from support import (TIMEOUT, Listener, RecordingStandIn, address, reset,
                     run_sender, wait_until)

import send_events_cybertrace as sec


class Sink:
    """A TCP server that records each connection's bytes; can misbehave:
    stall (read nothing until closed), reset (after 100,000 bytes), slam
    (reset every connection at once), or trickle (answer a byte every
    0.2 s, for ever)."""

    def __init__(self, mode: str = "read", byte: bytes = b"x") -> None:
        self.mode = mode
        self.byte = byte
        self.data = bytearray()
        self.server = socket.create_server(("127.0.0.1", 0))
        if mode in ("stall", "reset"):
            # A small receive window fills fast, so the sender stalls soon;
            # and a reset always finds bytes not yet acknowledged, however
            # late this thread reads (a large window let the kernel take
            # everything before the reset on a busy machine).
            self.server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.address = self.server.getsockname()[:2]
        self.done = threading.Event()
        self.release = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        try:
            sock, _ = self.server.accept()
            while self.mode == "slam":
                reset(sock)
                sock, _ = self.server.accept()
        except OSError:
            return
        with sock:
            sock.settimeout(TIMEOUT)
            try:
                if self.mode == "stall":
                    self.release.wait(TIMEOUT)
                while self.mode == "trickle" and not self.release.wait(0.2):
                    sock.sendall(self.byte)
                while True:
                    data = sock.recv(65536)
                    if not data:
                        break
                    self.data += data
                    if self.mode == "reset" and len(self.data) > 100000:
                        reset(sock)
                        return
            except OSError:
                pass
        self.done.set()

    def close(self) -> None:
        self.release.set()
        try:
            self.server.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.server.close()
        self.thread.join(TIMEOUT)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class FramingTest(unittest.TestCase):
    def send_file(self, content: bytes, *args: str) -> bytes:
        with tempfile.NamedTemporaryFile(suffix=".log") as f, Sink() as sink:
            f.write(content)
            f.flush()
            proc = run_sender(f.name, "-c", address(sink), *args)
            self.assertEqual(proc.returncode, 0, proc.stderr)
            self.assertTrue(sink.done.wait(TIMEOUT))
            return bytes(sink.data)

    def test_each_line_is_sent_with_exactly_one_newline(self):
        content = (b"first\r\n\r\n\nsecond\n   \n\t\r\nthird \xff\xfe "
                   b"not utf-8\r\nlast without newline")
        self.assertEqual(self.send_file(content),
                         b"first\nsecond\nthird \xff\xfe not utf-8\n"
                         b"last without newline\n")

    def test_default_mode_sends_no_flags(self):
        with RecordingStandIn() as ct:
            proc = run_sender("-c", address(ct), "-e", "a=1", "-e", "b=2")
            self.assertEqual(proc.returncode, 0, proc.stderr)
            # The sender is done once the bytes are acknowledged; the
            # stand-in's thread may not have taken them yet.
            wait_until(lambda: len(ct.received()) >= 8, what="the events",
                       seen=ct.received)
            self.assertEqual(ct.received(), b"a=1\nb=2\n")
            self.assertEqual(ct.flags(), [[]])

    def test_sources_stdin_files_events_and_repeat(self):
        with tempfile.NamedTemporaryFile() as f, Sink() as sink:
            f.write(b"from file\n")
            f.flush()
            proc = run_sender(f.name, "-", "-e", "from option", "-c",
                              address(sink), "--repeat", "2",
                              stdin=b"from stdin")
            self.assertEqual(proc.returncode, 0, proc.stderr)
            self.assertTrue(sink.done.wait(TIMEOUT))
            self.assertEqual(bytes(sink.data), b"from file\nfrom stdin\n"
                             b"from option\n" * 1 + b"from file\nfrom stdin\n"
                             b"from option\n")
        with Sink() as sink:
            proc = run_sender("-c", address(sink), stdin=b"no source: stdin")
            self.assertEqual(proc.returncode, 0, proc.stderr)
            self.assertTrue(sink.done.wait(TIMEOUT))
            self.assertEqual(bytes(sink.data), b"no source: stdin\n")

    def test_a_long_line_from_a_pipe_is_cut_as_cybertrace_cuts_it(self):
        # Held whole, a line from a pipe cost its square in copies and
        # memory without end (/dev/zero); CyberTrace splits inbound events
        # over 64 KB anyway.
        line = bytes(range(32, 127)) * 40000  # 3.8 MB, one line
        with Sink() as sink:
            proc = run_sender("-c", address(sink), stdin=line + b"\nnext\n")
            self.assertEqual(proc.returncode, 0, proc.stderr)
            self.assertTrue(sink.done.wait(TIMEOUT))
            pieces = bytes(sink.data).split(b"\n")
        self.assertEqual(pieces[-2:], [b"next", b""])
        self.assertEqual(b"".join(pieces[:-2]), line)
        self.assertEqual({len(p) for p in pieces[:-3]}, {64 * 1024})
        err = proc.stderr.decode()
        self.assertEqual(len(re.findall("warning", err)), 1, err)
        self.assertIn("stdin: a line longer than 64 KiB sent in pieces", err)

    def test_a_long_line_is_warned_of_once_however_often_repeated(self):
        line = b"q" * 100000 + b"\n"
        with Sink() as sink:
            proc = run_sender("-c", address(sink), "--repeat", "20",
                              stdin=line)
            self.assertEqual(proc.returncode, 0, proc.stderr)
            self.assertTrue(sink.done.wait(TIMEOUT))
        self.assertEqual(len(bytes(sink.data)), 20 * (len(line) + 1))
        err = proc.stderr.decode()
        self.assertEqual(len(re.findall("warning", err)), 1, err)

    def test_a_large_file_arrives_byte_exact(self):
        lines = [b"event=%d %s" % (i, b"x" * (i % 500)) for i in range(20000)]
        data = self.send_file(b"\r\n".join(lines))
        self.assertEqual(data, b"\n".join(lines) + b"\n")

    def test_rate_spreads_events_over_time(self):
        with Sink() as sink:
            started = time.monotonic()
            proc = run_sender("-c", address(sink), "--rate", "20",
                              stdin=b"e\n" * 11)
            took = time.monotonic() - started
            self.assertEqual(proc.returncode, 0, proc.stderr)
            self.assertTrue(sink.done.wait(TIMEOUT))
            self.assertEqual(bytes(sink.data), b"e\n" * 11)
            # 11 events at 20 per second cannot take less than 0.5 s.
            self.assertGreaterEqual(took, 0.5)

    def test_demo_sends_one_event_per_test_indicator(self):
        with RecordingStandIn() as ct:
            proc = run_sender("--demo", "-c", address(ct))
            self.assertEqual(proc.returncode, 0, proc.stderr)
            wait_until(lambda: ct.received().count(b"\n") >=
                       len(sec.TEST_FIELDS), what="the demo events",
                       seen=ct.received)
            events = ct.received().decode().splitlines()
        self.assertEqual(len(events), len(sec.TEST_FIELDS))
        for (_, indicator), event in zip(sec.TEST_FIELDS, events):
            self.assertIn(indicator, event)
        self.assertEqual({i for _, i in sec.TEST_FIELDS}, set(INDICATORS))


class ReplyBackTest(unittest.TestCase):
    def test_reply_back_prints_answers_until_each_lookup_finished(self):
        with RecordingStandIn() as ct:
            proc = run_sender("--reply-back", "-c", address(ct), "-e",
                              "url=http://fakess123.nu", "-e", "nothing here",
                              "-e", "md5=776735A8CA96DB15B422879DA599F474 "
                              "dst=192.0.2.1")
            self.assertEqual(proc.returncode, 0, proc.stderr)
            self.assertEqual(ct.flags(), [[b"X-KF-SendFinishedEvent",
                                           b"X-KF-ReplyBack"]])
        lines = proc.stdout.decode().splitlines()
        self.assertEqual(len(lines), 6, lines)
        self.assertIn("matchedIndicator=http://fakess123.nu", lines[0])
        self.assertIn("LookupFinished sent_events=1", lines[1])
        self.assertIn("LookupFinished sent_events=0", lines[2])
        self.assertIn("776735A8CA96DB15B422879DA599F474", lines[3])
        self.assertIn("matchedIndicator=192.0.2.1", lines[4])
        self.assertIn("LookupFinished sent_events=2", lines[5])
        self.assertIn("3 events", proc.stderr.decode())

    def test_no_answer_fails_after_the_timeout(self):
        with RecordingStandIn(answer=False) as ct:
            started = time.monotonic()
            proc = run_sender("--reply-back", "-c", address(ct), "-t", "0.5",
                              "-e", "x=1")
            self.assertLess(time.monotonic() - started, TIMEOUT)
        self.assertEqual(proc.returncode, 1)
        self.assertRegex(proc.stderr.decode(),
                         r"^\S+: error: .*0 of 1 event answered "
                         r"\(timed out waiting for answers\)\n$")

    def test_flags_glued_to_the_first_event_are_parsed(self):
        with RecordingStandIn() as ct, \
                socket.create_connection(ct.address, TIMEOUT) as sock:
            sock.sendall(b"X-KF-SendFinishedEventX-KF-ReplyBack"
                         b"url=http://fakess123.nu\n")
            answer = b""
            while answer.count(b"\n") < 2:
                answer += sock.recv(4096)
        self.assertIn(b"matchedIndicator=http://fakess123.nu", answer)
        self.assertIn(b"LookupFinished", answer)

    def test_flags_split_across_reads(self):
        left, right = socket.socketpair()
        with left, right:
            right.settimeout(TIMEOUT)
            for piece in (b"X-KF-Repl", b"yBack", b"PI", b"NG"):
                left.sendall(piece)
                time.sleep(0.01)
            left.shutdown(socket.SHUT_WR)
            self.assertEqual(read_flags(right),
                             ([b"X-KF-ReplyBack", b"PING"], b""))


class PingTest(unittest.TestCase):
    def test_pong_with_or_without_newline(self):
        for pong in (b"PONG", b"PONG\n", b"PONG\r\n"):
            with self.subTest(pong=pong), RecordingStandIn(pong=pong) as ct:
                proc = run_sender("--ping", "-c", address(ct))
                self.assertEqual(proc.returncode, 0, proc.stderr)
                self.assertEqual(ct.flags(), [[b"X-KF-ReplyBack", b"PING"]])
                self.assertIn(b"PONG", proc.stderr)

    def test_no_pong_is_exit_1(self):
        with RecordingStandIn(pong=b"") as ct:
            proc = run_sender("--ping", "-c", address(ct))
        self.assertEqual(proc.returncode, 1)
        self.assertIn(b"no PONG", proc.stderr)


class ErrorTest(unittest.TestCase):
    def assert_error(self, proc, pattern: str, status: int = 1) -> None:
        err = proc.stderr.decode()
        self.assertEqual(proc.returncode, status, err)
        self.assertNotIn("Traceback", err)
        self.assertEqual(len(err.splitlines()), 1, err)
        self.assertRegex(err, pattern)

    def free_port(self) -> int:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            return probe.getsockname()[1]

    def test_connection_refused(self):
        self.assert_error(run_sender("-c", "127.0.0.1:%d" % self.free_port(),
                                     "-e", "x"),
                          r"error: cannot connect to 127\.0\.0\.1:\d+: "
                          r"Connection refused")

    def test_port_zero_is_an_argument_error(self):
        # Port 0 only means "a free port" to a listener: it was a late
        # "Connection refused" on 127.0.0.1:0.
        for text in ("0", "127.0.0.1:0", "[::1]:0"):
            with self.subTest(text=text):
                self.assert_error(run_sender("-c", text, "-e", "x"),
                                  r"argument -c/--connect: .*port 0 is not "
                                  r"a port to connect to", status=2)

    def test_host_not_found(self):
        self.assert_error(run_sender("-c", "no-such-host.invalid:9999",
                                     "-e", "x"),
                          r"error: cannot resolve no-such-host\.invalid")

    def test_file_not_found(self):
        self.assert_error(run_sender("/nonexistent/events.txt"),
                          r"error: cannot read /nonexistent/events\.txt: "
                          r"No such file or directory")

    def test_reset_mid_stream_says_how_many_events_got_through(self):
        with Sink("reset") as sink:
            proc = run_sender("-c", address(sink), "--repeat", "50",
                              stdin=b"event with some padding\n" * 10000)
        self.assert_error(proc, r"error: connection to 127\.0\.0\.1:\d+ "
                                r"lost: .* \([\d,]+ events sent, [\d,]+ "
                                r"acknowledged by the peer\)")

    def test_a_peer_that_stops_reading_times_out_with_a_count(self):
        with Sink("stall") as sink:
            started = time.monotonic()
            proc = run_sender("-c", address(sink), "-t", "0.5",
                              stdin=b"event\n" * 2000000)
            self.assertLess(time.monotonic() - started, TIMEOUT)
        self.assert_error(proc, r"error: timed out sending to .*: [\d,]+ "
                                r"events sent, [\d,]+ acknowledged by the "
                                r"peer")
        delivered = int(re.search(rb"([\d,]+) acknowledged",
                                  proc.stderr).group(1).replace(b",", b""))
        self.assertLess(delivered, 2000000)

    def test_success_means_acknowledged_not_just_written(self):
        # Small enough for the sender's kernel to take it all at once: only
        # the peer's acknowledgement tells delivery from a write.
        with Sink("stall") as sink:
            proc = run_sender("-c", address(sink), "-t", "0.5",
                              stdin=b"event\n" * 20000)
        self.assert_error(proc, r"error: timed out after 0\.5 s: 20,000 "
                                r"events sent, [\d,]+ acknowledged by the "
                                r"peer")
        with Sink("reset") as sink:
            proc = run_sender("-c", address(sink),
                              stdin=b"event with some padding\n" * 9000)
        self.assert_error(proc, r"error: connection to .* lost: .*\([\d,]+ "
                                r"events sent, [\d,]+ acknowledged by the "
                                r"peer\)")

    def test_bad_arguments_exit_2(self):
        for args in (("-c", "nowhere"), ("--rate", "0"), ("--repeat", "x"),
                     ("--ping", "--reply-back"), ("-v", "-q")):
            with self.subTest(args=args):
                proc = run_sender(*args)
                self.assertEqual(proc.returncode, 2)
                self.assertNotIn(b"Traceback", proc.stderr)

    def test_verbose_quiet_and_summary(self):
        with Sink() as sink:
            proc = run_sender("-c", address(sink), "-v", "-e", "one",
                              "-e", "two")
            self.assertEqual(proc.stderr.decode().splitlines()[:4],
                             ["Sending:", "one", "Sending:", "two"])
            self.assertRegex(proc.stderr.decode().splitlines()[-1],
                             r"^Sent 2 events, 8 bytes to 127\.0\.0\.1:\d+ in "
                             r"\d+\.\d+ s$")
        with Sink() as sink:
            proc = run_sender("-c", address(sink), "-q", "-e", "one")
            self.assertEqual((proc.returncode, proc.stderr), (0, b""))


class EndToEndTest(unittest.TestCase):
    def test_demo_detections_reach_the_listener(self):
        with Listener("-f", "json") as listener, \
                RecordingStandIn(output=listener.address) as ct:
            proc = run_sender("--demo", "-c", address(ct))
            self.assertEqual(proc.returncode, 0, proc.stderr)
            listener.wait_stdout(len(INDICATORS))
            import json
            records = [json.loads(line) for line in
                       bytes(listener.out).splitlines()]
        matched = {r["fields"]["matchedIndicator"] for r in records}
        self.assertEqual(matched, set(INDICATORS))


if __name__ == "__main__":
    unittest.main()
