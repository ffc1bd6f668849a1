"""The sender stops on -t and on signals, whatever its stdout does."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import unittest

from support import (SENDER, TIMEOUT, RecordingStandIn, address, user_env,
                     wait_until)

try:
    import fcntl
    import termios
except ImportError:  # not POSIX
    fcntl = None

# Enough answers to fill a pipe nobody reads and every socket buffer after.
ARGS = ("--test-events", "--repeat", "1200", "--reply-back")


@unittest.skipIf(fcntl is None, "needs POSIX pipes")
class StdoutNobodyReadsTest(unittest.TestCase):
    """--reply-back with its answers going to a pipe nobody reads."""

    def start(self, ct, *args: str) -> subprocess.Popen:
        self.read_end, write_end = os.pipe()
        self.addCleanup(os.close, self.read_end)
        try:
            proc = subprocess.Popen(
                [sys.executable, str(SENDER), "-c", address(ct), *ARGS,
                 *args], stdout=write_end, stderr=subprocess.PIPE,
                env=user_env())
        finally:
            os.close(write_end)
        self.addCleanup(self.end, proc)
        return proc

    def end(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=TIMEOUT)

    def unread(self) -> int:
        answer = fcntl.ioctl(self.read_end, termios.FIONREAD, b"\0\0\0\0")
        return int.from_bytes(answer, sys.byteorder)

    def stalled(self) -> bool:
        """Say whether the pipe is over half full and has stopped filling."""
        # Answers go out a line at a time: a pipe may stop short of full.
        before = self.unread()
        time.sleep(0.2)
        return before >= 32768 and self.unread() == before

    def finish(self, proc: subprocess.Popen) -> tuple:
        try:
            _, err = proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate(timeout=TIMEOUT)
            self.fail("the sender did not stop")
        return proc.returncode, err.decode()

    def test_timeout_stops_it(self):
        with RecordingStandIn() as ct:
            status, err = self.finish(self.start(ct, "-t", "1"))
        self.assertEqual(status, 1, err)
        self.assertRegex(err, r"^send_events_cybertrace\.py: error: .*"
                         r"stdout has taken no answer for [\d.]+ s\)?\n$")

    def test_a_signal_stops_it_with_the_true_counts(self):
        for number, word, code in ((signal.SIGINT, "interrupted", 130),
                                   (signal.SIGTERM, "terminated", 143)):
            with self.subTest(word), RecordingStandIn() as ct:
                proc = self.start(ct, "-t", "30")
                wait_until(lambda: self.stalled() or
                           proc.poll() is not None, what="a full stdout")
                proc.send_signal(number)
                status, err = self.finish(proc)
                self.assertEqual(status, code, err)
                found = re.search(r"^send_events_cybertrace\.py: %s: "
                                  r"([\d,]+) events sent, ([\d,]+) "
                                  r"acknowledged; [\d,]+ events? answered"
                                  % word, err)
                self.assertIsNotNone(found, err)
                sent, acked = (int(n.replace(",", ""))
                               for n in found.groups())
                self.assertGreater(acked, 0, err)
                self.assertLessEqual(acked, sent)
                # No event reached the peer that was not counted as sent.
                self.assertLessEqual(ct.received().count(b"\n"), sent)


if __name__ == "__main__":
    unittest.main()
