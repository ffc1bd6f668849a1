"""A peer whose events are dear gets fewer bytes a round, not as many."""

from __future__ import annotations

import socket
import threading
import unittest
from unittest import mock

from support import TIMEOUT, TUTORIAL_EVENTS, Listener, wait_until

import listen_events_cybertrace as lec

KNOWN = "".join(e + "\n" for e in TUTORIAL_EVENTS).encode()


class PlanCompileTest(unittest.TestCase):
    def test_a_shape_of_128_long_keys_gets_no_plan(self):
        # 14 KB, 128 keys of 100 bytes: 33 ms to compile.
        line = b"- " + b" ".join((b"k%d_" % key).ljust(100, b"x") + b"=1"
                                 for key in range(128)) + b"\n"
        formatter = lec.JsonFormatter()
        for _ in range(3):
            formatter.format(line, [line], "p", 0.0, False)
        self.assertEqual(formatter.plans(), 0)

    def test_one_peers_new_shapes_leave_another_its_plans(self):
        formatter = lec.JsonFormatter()
        with mock.patch.object(lec.time, "monotonic", return_value=100.0):
            for number in range(200):  # one a batch: every batch compiles
                line = b"- k%d=1 a=2 b=3\n" % number
                formatter.format(line, [line], "x", 0.0, False)
            before = formatter.plans()
            formatter.format(KNOWN, lec.split_lines(KNOWN), "p", 0.0, False)
        self.assertGreater(formatter.plans(), before)


class TinyEventFloodTest(unittest.TestCase):
    def test_a_flood_of_tiny_events_gets_fewer_bytes_than_a_victim(self):
        stop = threading.Event()
        sent = [0]

        def flood(sock):
            chunk = b"a\n" * 32768
            try:
                while not stop.is_set():
                    sock.sendall(chunk)
                    sent[0] += len(chunk) // 2
            except OSError:
                pass
        victim_events = KNOWN * 20000
        with Listener("-f", "raw") as listener:
            flooder = listener.connect()
            thread = threading.Thread(target=flood, args=(flooder,))
            thread.start()
            try:
                listener.wait_stdout(100000)
                with listener.connect() as victim:
                    victim.sendall(victim_events)
                    victim.shutdown(socket.SHUT_WR)
                    wait_until(lambda: listener.out.count(
                        TUTORIAL_EVENTS[-1].encode()) >= 20000,
                        TIMEOUT * 4, "the victim's events")
                self.assertTrue(thread.is_alive())  # still flooding
            finally:
                stop.set()
                thread.join(TIMEOUT)
                flooder.close()
            listener.wait_stdout(sent[0] + 20000 * len(TUTORIAL_EVENTS))
            out = bytes(listener.out)
        first = out.index(TUTORIAL_EVENTS[0].encode())
        last = out.rindex(TUTORIAL_EVENTS[-1].encode())
        flood_bytes = out.count(b"\na\n", first, last) * 2
        # Served by reads, the flood got as many bytes as the victim; by
        # cost, a small share (its bytes cost many times more each).
        self.assertLess(flood_bytes, len(victim_events) / 2)
        # Nothing of either is lost.
        self.assertEqual(out.count(TUTORIAL_EVENTS[-1].encode()), 20000)
        self.assertEqual(out.split(b"\n").count(b"a"), sent[0])


if __name__ == "__main__":
    unittest.main()
