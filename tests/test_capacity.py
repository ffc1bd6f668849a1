"""send_events_cybertrace.py --load: the capacity test, against the
stand-in given a capacity, and against a peer that never answers."""

from __future__ import annotations

import json
import os
import random
import signal
import socketserver
import sys
import tempfile
import threading
import unittest

from support import (SENDER, TIMEOUT, Process, RecordingStandIn, address,
                     run_sender)

import cybertrace_capacity as capacity


class LoadTest(unittest.TestCase):

    def setUp(self) -> None:
        folder = tempfile.TemporaryDirectory()
        self.addCleanup(folder.cleanup)
        self.json_path = os.path.join(folder.name, "load.json")

    def load(self, ct, *args: str):
        """Run --load against ct; return (process, the JSON result)."""
        done = run_sender("--load", "-c", address(ct), "--json",
                          self.json_path, "--step-seconds", "0.5", *args,
                          timeout=60)
        with open(self.json_path, encoding="utf-8") as file:
            return done, json.load(file)

    def best(self, result: dict) -> dict:
        return max((s for s in result["steps"] if s["verdict"] == "kept up"),
                   key=lambda s: s["answered_rate"])

    def test_finds_the_eps_limit_and_latency_rising_above_it(self):
        with RecordingStandIn(record=False, eps=5000) as ct:
            done, result = self.load(ct, "--start-rate", "2500",
                                     "--max-latency", "0.3")
        out = done.stdout.decode()
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertAlmostEqual(result["sustained"], 5000, delta=500,
                               msg=out)
        best = self.best(result)
        above = min((s for s in result["steps"] if s["rate"] > best["rate"]),
                    key=lambda s: s["rate"])
        self.assertTrue(above["verdict"].startswith("behind"), out)
        self.assertGreater(above["p99"], best["p99"], out)
        self.assertRegex(out.splitlines()[-1],
                         r"^CyberTrace at 127\.0\.0\.1:\d+ answers [\d,]+ "
                         r"events/s over 8 connections \(p50 .* ms, p99 .*\);"
                         r" at [\d,]+ offered it fell behind")

    def test_latency_is_the_lookup_time_below_the_knee(self):
        # 4 scanners at 20 ms a lookup take 200 events/s.
        with RecordingStandIn(record=False, lookup_ms=20, scanners=4) as ct:
            done, result = self.load(ct, "--connections", "4",
                                     "--start-rate", "50", "--max-rate",
                                     "100")
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual([s["rate"] for s in result["steps"]], [50, 100])
        for step in result["steps"]:
            self.assertEqual(step["verdict"], "kept up")
            self.assertAlmostEqual(step["p50"], 0.020, delta=0.005,
                                   msg=done.stdout.decode())
            self.assertGreater(step["detections"], 0)
        self.assertIn("it kept up to the end (--max-rate reached)",
                      done.stdout.decode())

    def test_stops_when_nothing_is_answered(self):
        with RecordingStandIn(record=False, answer=False) as ct:
            # 8 connections with 3 events in flight each: of the 50 due,
            # 26 are never sent.
            done, result = self.load(ct, "--start-rate", "100",
                                     "--in-flight", "3", "--max-latency",
                                     "0.2")
        self.assertEqual(done.returncode, 1, done.stderr)
        step, = result["steps"]
        self.assertEqual(step["offered"], 50)
        self.assertEqual(step["capped"], 26)
        self.assertEqual(step["unanswered"], 50)
        self.assertRegex(done.stdout.decode().splitlines()[-1],
                         r"answered 0 of 50 events over 8 connections in "
                         r"0\.\d s at 100 offered: it fell behind at the "
                         r"lowest rate")

    def test_ctrl_c_reports_what_was_measured(self):
        with RecordingStandIn(record=False) as ct, Process(
                [sys.executable, str(SENDER), "--load", "-c", address(ct),
                 "--step-seconds", "30"]) as sender:
            sender.wait_stderr("ramping up over 8 connections")
            sender.signal(signal.SIGINT)
            self.assertEqual(sender.finish(), 130)
            out = sender.out.decode()
        self.assertRegex(out.splitlines()[-1], r"^CyberTrace at .*: "
                         r"interrupted in the first step \(100/s offered\)")
        self.assertIn("interrupted", out.splitlines()[1])


class EchoDroppingPeer(socketserver.ThreadingTCPServer):
    """A CyberTrace whose LookupFinished echoes the event (%REQ%) and
    that drops every fifth event without an answer, as over EPSLimit."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), EchoDroppingHandler)
        self.thread = threading.Thread(target=self.serve_forever,
                                       kwargs={"poll_interval": 0.05})

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.thread.join(TIMEOUT)
        self.server_close()


class EchoDroppingHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        self.request.settimeout(TIMEOUT)
        flags = b"X-KF-SendFinishedEventX-KF-ReplyBack"
        if self.rfile.read(len(flags)) != flags:
            return
        number = 0
        try:
            for line in self.rfile:
                number += 1
                if number % 5:
                    self.wfile.write(b"eventName=LookupFinished req=" +
                                     line)
                    self.wfile.flush()
        except OSError:
            pass


class MatchingTest(unittest.TestCase):
    def test_an_echoed_answer_skips_the_dropped_events_ahead(self):
        # Matched in order alone, each answer after a drop would be taken
        # for an older event's, and its latency would grow with the drops.
        with tempfile.TemporaryDirectory() as folder, \
                EchoDroppingPeer() as peer:
            path = os.path.join(folder, "load.json")
            done = run_sender("--load", "-c", "127.0.0.1:%d" %
                              peer.server_address[1], "--json", path,
                              "--connections", "2", "--start-rate", "200",
                              "--max-rate", "200", "--step-seconds", "1",
                              timeout=60)
            with open(path, encoding="utf-8") as file:
                step, = json.load(file)["steps"]
        self.assertEqual(step["unanswered"], step["offered"] // 5,
                         done.stdout)
        self.assertEqual(step["answered"], step["offered"] -
                         step["unanswered"])
        self.assertLess(step["p99"], 0.1, done.stdout)


class LatenciesTest(unittest.TestCase):
    def test_percentiles_are_within_a_thousandth_in_bounded_memory(self):
        latencies = capacity.Latencies()
        exact = [random.lognormvariate(-6, 2) for _ in range(100000)]
        for seconds in exact:
            latencies.record(seconds)
        exact.sort()
        for share in (0.5, 0.9, 0.99, 0.999):
            want = exact[int(share * len(exact))]
            self.assertAlmostEqual(latencies.percentile(share), want,
                                   delta=max(want * 0.001, 1e-6))
        self.assertEqual(latencies.percentile(1.0), exact[-1])
        # A thousandth wide: 2,303 buckets a decade of microseconds.
        decades = len(str(int(exact[-1] * 1e6)))
        self.assertLessEqual(len(latencies.buckets), 2303 * decades)


if __name__ == "__main__":
    unittest.main()
