"""The scripts on a stdlib without POSIX-only names, as on Windows.

A sitecustomize (tests/posixless/) removes signal.SIGHUP, SIGUSR1 and
SIGUSR2 and makes fcntl and termios unimportable; both scripts must still
start, serve, stop and report.  The full proof runs on a real Windows
Python under wine (tests/windows/).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import unittest

from support import ROOT, SENDER, TIMEOUT, Listener, RecordingStandIn, user_env

GUARD = ROOT / "tests" / "posixless"


def posixless_env() -> dict:
    """Return a user's environment with the guard's sitecustomize on top."""
    env = user_env()
    env["PYTHONPATH"] = os.pathsep.join(
        [str(GUARD)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def run_sender(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SENDER), *args],
                          stdin=subprocess.DEVNULL, capture_output=True,
                          timeout=TIMEOUT, env=posixless_env())


class PosixlessTest(unittest.TestCase):

    def assertClean(self, stderr: bytes) -> None:
        self.assertNotIn(b"Traceback", stderr)
        self.assertNotIn(b"Error:", stderr)

    def test_the_guard_takes_the_names_away(self):
        probe = ("import signal\n"
                 "print(hasattr(signal, 'SIGHUP'), "
                 "hasattr(signal, 'SIGUSR1'))\n"
                 "for name in ('fcntl', 'termios'):\n"
                 "    try:\n"
                 "        __import__(name)\n"
                 "    except ImportError:\n"
                 "        print(name, 'missing')\n")
        done = subprocess.run([sys.executable, "-c", probe],
                              capture_output=True, timeout=TIMEOUT,
                              env=posixless_env())
        self.assertEqual(done.stdout.split(b"\n"),
                         [b"False False", b"fcntl missing",
                          b"termios missing", b""], done.stderr)

    def test_listener_serves_and_stops_with_the_summary(self):
        for number in (signal.SIGINT, signal.SIGTERM):
            with self.subTest(signal=number), \
                    tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "events.log")
                with Listener("-f", "raw", "-o", path,
                              env=posixless_env()) as listener:
                    for peer in range(3):
                        listener.send(b"peer %d one\r\npeer %d two\n"
                                      % (peer, peer))
                    listener.wait_for(lambda: os.path.exists(path) and
                                      os.path.getsize(path) >= 66,
                                      what="6 events in the file")
                    listener.signal(number)
                    self.assertEqual(listener.finish(), 0)
                    listener.wait_stderr(r"Stopped: 6 events")
                    self.assertClean(listener.err)
                with open(path, "rb") as file:
                    self.assertEqual(sorted(file.read().split(b"\n")),
                                     [b""] + sorted(
                                         b"peer %d %s" % (p, w)
                                         for p in range(3)
                                         for w in (b"one", b"two")))

    def test_listening_on_every_interface_without_fcntl(self):
        # Listing this host's addresses uses ioctl where it can.
        with Listener("-t", "0.2", listen="0.0.0.0:0",
                      env=posixless_env()) as listener:
            self.assertEqual(listener.finish(), 0)
            listener.wait_stderr(r"Waiting for CyberTrace")
            self.assertClean(listener.err)

    def test_sender_file_event_and_demo_reach_the_listener(self):
        with tempfile.NamedTemporaryFile("wb", suffix=".log",
                                         delete=False) as file:
            file.write(b"from a file\r\nand its second line\n")
        self.addCleanup(os.unlink, file.name)
        with Listener("-f", "raw", env=posixless_env()) as listener:
            where = "%s:%d" % listener.address
            for args in ([file.name], ["-e", "one event"], ["--demo"]):
                done = run_sender("-c", where, *args)
                self.assertEqual(done.returncode, 0, done.stderr)
                self.assertRegex(done.stderr, rb"^Sent \d+ events?\b")
            listener.wait_stdout(2 + 1 + 17)
            listener.signal(signal.SIGTERM)
            self.assertEqual(listener.finish(), 0)
            lines = listener.out.split(b"\n")
            self.assertIn(b"from a file", lines)
            self.assertIn(b"one event", lines)
            self.assertEqual(len([x for x in lines if b"cybertrace-demo" in
                                  x]), 17)
            self.assertClean(listener.err)

    def test_sender_ping_and_reply_back(self):
        with RecordingStandIn() as ct:
            where = "%s:%d" % ct.address
            done = run_sender("--ping", "-c", where)
            self.assertEqual(done.returncode, 0, done.stderr)
            self.assertIn(b"PONG from", done.stderr)
            done = run_sender("--demo", "--reply-back", "-c", where)
            self.assertEqual(done.returncode, 0, done.stderr)
            self.assertEqual(done.stdout.count(b"LookupFinished"), 17)
            self.assertClean(done.stderr)


if __name__ == "__main__":
    unittest.main()
