"""send_events_cybertrace.py --load: the capacity test, against the
stand-in given a capacity, and against a peer that never answers."""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import unittest

from support import (SENDER, Process, RecordingStandIn, address,
                     run_sender)


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


if __name__ == "__main__":
    unittest.main()
