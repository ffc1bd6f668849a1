"""Faults: killed and stalling peers, slowloris, signals mid-stream."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import unittest
from collections import defaultdict

from support import (LISTENER, ROOT, SENDER, TIMEOUT, Listener, Process,
                     queue_peers, user_env)


@contextlib.contextmanager
def descriptor_limited_listener(soft: int, hard: int):
    """Run the listener with RLIMIT_NOFILE (soft, hard); give its address."""
    code = ("import os, resource, sys\n"
            "resource.setrlimit(resource.RLIMIT_NOFILE, (%d, %d))\n"
            "os.execv(sys.executable, [sys.executable, %r, '-l', "
            "'127.0.0.1:0', '-f', 'raw'])\n" % (soft, hard, str(LISTENER)))
    with Process([sys.executable, "-c", code]) as listener:
        found = listener.wait_stderr(r"Starting on 127\.0\.0\.1:(\d+)")
        listener.address = ("127.0.0.1", int(found.group(1)))
        yield listener


class PeerFaultTest(unittest.TestCase):
    def test_sender_killed_mid_event(self):
        with Listener("-f", "raw") as listener:
            child = subprocess.Popen(
                [sys.executable, "-c",
                 "import socket, sys, time\n"
                 "s = socket.create_connection(('%s', %d))\n"
                 "s.sendall(b'whole event\\nhalf an ev')\n"
                 "print('sent', flush=True)\n"
                 "time.sleep(60)\n" % listener.address],
                stdout=subprocess.PIPE)
            try:
                self.assertEqual(child.stdout.readline(), b"sent\n")
                listener.wait_stdout(1)
                child.kill()
            finally:
                child.wait(TIMEOUT)
                child.stdout.close()
            listener.wait_stdout(2)
            self.assertEqual(bytes(listener.out), b"whole event\nhalf an ev\n")
            listener.send(b"next\n")
            listener.wait_stdout(3)

    def test_many_silent_peers_and_one_that_talks(self):
        with Listener("-f", "raw") as listener:
            silent = [listener.connect() for _ in range(50)]
            try:
                listener.send(b"heard\n")
                listener.wait_stdout(1)
                self.assertEqual(bytes(listener.out), b"heard\n")
            finally:
                for sock in silent:
                    sock.close()

    def test_slowloris_with_and_without_idle_timeout(self):
        with Listener("-f", "raw", "--idle-timeout", "0.5") as listener, \
                listener.connect() as slow:
            slow.sendall(b"s")
            time.sleep(0.05)
            slow.sendall(b"l")
            listener.wait_stderr(r"Closed \S+ \(idle for 0\.5 s\)")
            listener.wait_stdout(1)
            self.assertEqual(bytes(listener.out), b"sl\n")
        with Listener("-f", "raw") as listener, listener.connect() as slow:
            for number, byte in enumerate(b"slow", 1):
                slow.sendall(bytes([byte]))
                listener.send(b"fast %c\n" % byte)
                # Each fast event comes out while the slow one is unfinished
                # (and in this order: each waits for the one before).
                listener.wait_stdout(number)
            slow.sendall(b"\n")
            listener.wait_stdout(5)
            lines = bytes(listener.out).splitlines()
            self.assertEqual(lines[-1], b"slow")
            self.assertEqual(lines[:4], [b"fast s", b"fast l", b"fast o",
                                         b"fast w"])

    def test_more_peers_than_max_connections(self):
        with Listener("-f", "raw", "--max-connections", "3") as listener:
            def talk(number):
                with listener.connect() as sock:
                    for seq in range(5):
                        sock.sendall(b"peer=%d seq=%d\n" % (number, seq))
                        time.sleep(0.01)
            threads = [threading.Thread(target=talk, args=(n,))
                       for n in range(12)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(TIMEOUT)
            listener.wait_stdout(60)
            self.assertEqual(sorted(bytes(listener.out).splitlines()),
                             sorted(b"peer=%d seq=%d" % (n, s)
                                    for n in range(12) for s in range(5)))

    def test_more_peers_than_file_descriptors(self):
        # 12 descriptors: the listener runs out after a few peers.
        with descriptor_limited_listener(12, 12) as listener:
            address = listener.address
            peers = [socket.create_connection(address, timeout=TIMEOUT)
                     for _ in range(20)]
            try:
                for index, sock in enumerate(peers):
                    sock.sendall(b"peer %d\n" % index)
                listener.wait_stderr("out of file descriptors")
            finally:
                for sock in peers:
                    sock.close()
            listener.wait_stdout(20)
            listener.signal(signal.SIGTERM)
            self.assertEqual(listener.finish(), 0)
            self.assertEqual(sorted(bytes(listener.out).splitlines()),
                             sorted(b"peer %d" % i for i in range(20)))

    @unittest.skipUnless(hasattr(__import__("resource"), "prlimit"),
                         "needs resource.prlimit (Linux)")
    def test_descriptors_that_come_back_are_used_again(self):
        # A brief shortage lowered --max-connections for good: peers that
        # stay connected then waited for places given up every 2 s.
        import resource
        with descriptor_limited_listener(12, 64) as listener:
            address = listener.address
            peers = [socket.create_connection(address, timeout=TIMEOUT)
                     for _ in range(12)]
            try:
                for index, sock in enumerate(peers):
                    sock.sendall(b"peer %d\n" % index)
                listener.wait_stderr("out of file descriptors")
                resource.prlimit(listener.proc.pid, resource.RLIMIT_NOFILE,
                                 (64, 64))
                listener.wait_stderr("file descriptors free again")
                listener.wait_stdout(12)
            finally:
                for sock in peers:
                    sock.close()
            listener.signal(signal.SIGTERM)
            self.assertEqual(listener.finish(), 0)
        self.assertEqual(sorted(bytes(listener.out).splitlines()),
                         sorted(b"peer %d" % i for i in range(12)))


class SignalMidStreamTest(unittest.TestCase):
    def test_every_byte_received_before_the_signal_is_written(self):
        for number in (signal.SIGTERM, signal.SIGINT):
            with self.subTest(signal=number), \
                    Listener("-f", "json") as listener:
                sent = {}
                sockets = []
                try:
                    listener.signal(signal.SIGSTOP)
                    # Accepted by the kernel while the listener sleeps: in
                    # socket buffers and in the accept queue.
                    for index in range(30):
                        sock = listener.connect()
                        data = b"".join(b"conn=%d seq=%d pad=%s\n" % (
                            index, seq, b"p" * 200) for seq in range(100))
                        data += b"conn=%d partial" % index
                        sock.sendall(data)
                        sent["127.0.0.1:%d" % sock.getsockname()[1]] = data
                        sockets.append(sock)
                    listener.signal(number)
                    listener.signal(signal.SIGCONT)
                    self.assertEqual(listener.finish(), 0)
                finally:
                    for sock in sockets:
                        sock.close()
                got = defaultdict(list)
                for line in bytes(listener.out).splitlines():
                    record = json.loads(line)
                    got[record["peer"]].append(record["event"])
                self.assertEqual(set(got), set(sent))
                for peer, data in sent.items():
                    self.assertEqual("\n".join(got[peer]), data.decode())
                self.assertIn("Stopped: 3,030 events,",
                              listener.stderr_text)

    def test_peers_waiting_in_the_accept_queue_are_drained(self):
        with Listener("-f", "raw", "--max-connections", "1") as listener:
            served = listener.connect()
            waiting = []
            try:
                served.sendall(b"served\n")
                listener.wait_stdout(1)
                # The listener takes no more peers now: these stay in the
                # kernel's accept queue, their bytes acknowledged.
                waiting = queue_peers(listener, 5)
                listener.wait_stderr("--max-connections")
                listener.signal(signal.SIGTERM)
                self.assertEqual(listener.finish(), 0)
            finally:
                served.close()
                for sock in waiting:
                    sock.close()
            self.assertEqual(sorted(bytes(listener.out).splitlines()), sorted(
                [b"served"] + [b"queued %d" % i for i in range(5)] +
                [b"queued partial %d" % i for i in range(5)]))

    def test_streams_cut_by_sigterm_are_whole_in_order_prefixes(self):
        with Listener("-f", "json") as listener:
            stop = threading.Event()
            sent = {}

            def stream(sock):
                seq = 0
                with sock:
                    try:
                        while not stop.is_set():
                            sock.sendall(b"".join(b"seq=%d pad=%s\n" % (
                                seq + i, b"q" * 100) for i in range(50)))
                            seq += 50
                            # Paced, so the drain's two seconds do not
                            # leave millions of events for us to check.
                            time.sleep(0.02)
                    except OSError:
                        pass
            sockets = [listener.connect() for _ in range(20)]
            for sock in sockets:
                sent["127.0.0.1:%d" % sock.getsockname()[1]] = True
            threads = [threading.Thread(target=stream, args=(s,))
                       for s in sockets]
            for thread in threads:
                thread.start()
            try:
                listener.wait_stdout(2000)
                listener.signal(signal.SIGTERM)
                self.assertEqual(listener.finish(), 0)
            finally:
                stop.set()
                for thread in threads:
                    thread.join(TIMEOUT)
            got = defaultdict(list)
            for line in bytes(listener.out).splitlines():
                record = json.loads(line)
                got[record["peer"]].append(record["event"])
            self.assertTrue(set(got) <= set(sent))
            for peer, events in got.items():
                want = ["seq=%d pad=%s" % (i, "q" * 100)
                        for i in range(len(events))]
                # Whole events in order, with no gap; only the last may be
                # cut short, where the stream was when the signal came.
                self.assertEqual(events[:-1], want[:-1], peer)
                self.assertTrue(want[-1].startswith(events[-1]), peer)


class SenderFaultTest(unittest.TestCase):
    def test_sender_against_a_stopped_listener(self):
        events = [b"event=%d pad=%s" % (i, b"z" * 50) for i in range(200000)]
        with Listener("-f", "raw") as listener:
            listener.signal(signal.SIGSTOP)
            try:
                started = time.monotonic()
                proc = subprocess.run(
                    [sys.executable, str(SENDER), "-c", "%s:%d" %
                     listener.address, "-t", "1"],
                    input=b"\n".join(events) + b"\n", capture_output=True,
                    timeout=TIMEOUT, env=user_env())
                took = time.monotonic() - started
            finally:
                listener.signal(signal.SIGCONT)
            self.assertEqual(proc.returncode, 1, proc.stderr)
            self.assertLess(took, 5)
            err = proc.stderr.decode()
            self.assertNotIn("Traceback", err)
            found = re.search(r"timed out .*: ([\d,]+) events sent, ([\d,]+) "
                              r"acknowledged by the peer", err)
            self.assertIsNotNone(found, err)
            acknowledged = int(found.group(2).replace(",", ""))
            self.assertGreater(acknowledged, 0)
            self.assertLess(acknowledged, len(events))
            listener.wait_stdout(acknowledged)
            self.assertEqual(listener.stop(), 0)
            out = bytes(listener.out).splitlines()
            # What the sender counted as arrived did arrive, in order.
            self.assertEqual(out[:acknowledged], events[:acknowledged])


class SoakTest(unittest.TestCase):
    def test_short_soak_loses_nothing_and_stays_flat(self):
        proc = subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / "soak.py"),
             "--duration", "2", "--rate", "2000"],
            capture_output=True, timeout=60, env=user_env())
        report = proc.stdout.decode() + proc.stderr.decode()
        self.assertEqual(proc.returncode, 0, report)
        self.assertRegex(report, r"events: sent (\d+), received \1\b")


if __name__ == "__main__":
    unittest.main()
