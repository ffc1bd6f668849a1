"""Against programs nobody here wrote: nc, socat, logger and rsyslog."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import unittest
from collections import Counter

from support import (TUTORIAL_EVENTS, SENDER, TIMEOUT, Listener, require_tool,
                     user_env)

EVENTS = [e.encode() for e in TUTORIAL_EVENTS] + [
    b"Apr 16 09:05:41 alert=KL_ALERT_UpdatedFeed "
    b"feed=Phishing_URL_Data_Feed.json records=200473",
    b"Category=KL_Malicious_URL|MatchedIndicator=http://fakess123.nu|"
    b"src=198.51.100.7",
] + [b"event=%d padding=%s" % (i, b"x" * (i % 300)) for i in range(200)]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(TIMEOUT)


def wait_file(path: str, predicate, what: str) -> bytes:
    deadline = time.monotonic() + TIMEOUT
    data = b""
    while time.monotonic() < deadline:
        if os.path.exists(path):
            with open(path, "rb") as f:
                data = f.read()
            if predicate(data):
                return data
        time.sleep(0.02)
    raise AssertionError("timed out waiting for %s; got %r"
                         % (what, data[-500:]))


class Rsyslog:
    """rsyslogd in the foreground with its own config, on loopback ports."""

    def __init__(self, test: unittest.TestCase, forward_to: int | None = None):
        path = require_tool(test, "rsyslogd")
        self.dir = tempfile.TemporaryDirectory()
        self.port = free_port()
        self.file = os.path.join(self.dir.name, "received.log")
        actions = ['action(type="omfile" file="%s" template="rawnl")'
                   % self.file]
        if forward_to is not None:
            actions.append('action(type="omfwd" target="127.0.0.1" '
                           'port="%d" protocol="tcp" template="raw")'
                           % forward_to)
        config = os.path.join(self.dir.name, "rsyslog.conf")
        with open(config, "w") as f:
            f.write('global(workDirectory="%s")\n'
                    'module(load="imtcp")\n'
                    'template(name="raw" type="string" string="%%rawmsg%%")\n'
                    'template(name="rawnl" type="string" '
                    'string="%%rawmsg%%\\n")\n'
                    'input(type="imtcp" address="127.0.0.1" port="%d" '
                    'supportOctetCountedFraming="off" ruleset="main")\n'
                    'ruleset(name="main") {\n  %s\n}\n'
                    % (self.dir.name, self.port, "\n  ".join(actions)))
        self.proc = subprocess.Popen(
            [path, "-n", "-f", config, "-i",
             os.path.join(self.dir.name, "rsyslogd.pid")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            self.wait_ready()
        except BaseException:
            self.close()
            raise

    def wait_ready(self) -> None:
        # A probe connection with one line: rsyslog is ready once the
        # line reaches its output file.
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port),
                                              timeout=1) as sock:
                    sock.sendall(b"rsyslog-ready\n")
                break
            except OSError:
                if self.proc.poll() is not None:
                    raise AssertionError("rsyslogd exited at start")
                time.sleep(0.05)
        wait_file(self.file, lambda d: b"rsyslog-ready\n" in d,
                  "rsyslog to start")

    def close(self) -> None:
        stop(self.proc)
        self.dir.cleanup()


class IntoListenerTest(unittest.TestCase):
    """Each peer delivers known events; each comes out once, whole."""

    def assert_delivered(self, listener: Listener, events: list,
                         extra_lines: int = 0) -> None:
        listener.wait_stdout(len(events) + extra_lines)
        self.assertEqual(listener.stop(), 0)
        got = Counter(bytes(listener.out).splitlines())
        for event in events:
            self.assertEqual(got[event], 1, event)
        self.assertEqual(sum(got.values()), len(events) + extra_lines)

    def events_file(self) -> str:
        f = tempfile.NamedTemporaryFile(delete=False, suffix=".log")
        with f:
            f.write(b"\n".join(EVENTS) + b"\n")
        self.addCleanup(os.unlink, f.name)
        return f.name

    def test_nc(self):
        nc = require_tool(self, "nc")
        with Listener("-f", "raw") as listener, \
                open(self.events_file(), "rb") as stdin:
            subprocess.run([nc, "-N", *listener.address_args()], stdin=stdin,
                           check=True, timeout=TIMEOUT)
            self.assert_delivered(listener, EVENTS)

    def test_socat(self):
        socat = require_tool(self, "socat")
        path = self.events_file()
        with Listener("-f", "raw") as listener:
            subprocess.run([socat, "-u", "FILE:%s" % path, "TCP:%s:%d"
                            % listener.address], check=True, timeout=TIMEOUT)
            self.assert_delivered(listener, EVENTS)

    def test_logger_tcp(self):
        logger = require_tool(self, "logger")
        path = self.events_file()
        with Listener("-f", "raw") as listener:
            subprocess.run([logger, "--tcp", "-n", "127.0.0.1", "-P",
                            str(listener.address[1]), "-t", "cybertrace",
                            "-f", path], check=True, timeout=TIMEOUT)
            listener.wait_stdout(len(EVENTS))
            self.assertEqual(listener.stop(), 0)
            lines = bytes(listener.out).splitlines()
        self.assertEqual(len(lines), len(EVENTS))
        for line, event in zip(lines, EVENTS):
            # RFC 5424 header, then the message, whole, one per line.
            self.assertTrue(line.startswith(b"<13>1 "), line)
            self.assertTrue(line.endswith(b" " + event), line)

    def test_rsyslog_omfwd(self):
        with Listener("-f", "raw") as listener:
            rsyslog = Rsyslog(self, forward_to=listener.address[1])
            try:
                with socket.create_connection(("127.0.0.1", rsyslog.port),
                                              timeout=TIMEOUT) as sock:
                    sock.sendall(b"\n".join(EVENTS) + b"\n")
                self.assert_delivered(listener, EVENTS, extra_lines=1)
            finally:
                rsyslog.close()
            self.assertIn(b"rsyslog-ready\n", bytes(listener.out))


class FromSenderTest(unittest.TestCase):
    """The sender's bytes reach other programs exactly."""

    def send(self, port: int) -> None:
        proc = subprocess.run([sys.executable, str(SENDER), "-c",
                               "127.0.0.1:%d" % port],
                              input=b"\r\n".join(EVENTS) + b"\r\n\r\n",
                              capture_output=True, timeout=TIMEOUT,
                              env=user_env())
        self.assertEqual(proc.returncode, 0, proc.stderr)

    def check_sink(self, argv: list, port: int, out: str) -> None:
        """Run a one-shot sink writing to out; send into it; compare."""
        with open(out, "wb") as f:
            proc = subprocess.Popen(argv, stdout=f, stdin=subprocess.DEVNULL)
        try:
            self.wait_port(port, proc)
            self.send(port)
            proc.wait(TIMEOUT)
        finally:
            stop(proc)
        with open(out, "rb") as f:
            self.assertEqual(f.read(), b"\n".join(EVENTS) + b"\n")

    def test_into_nc(self):
        nc = require_tool(self, "nc")
        port = free_port()
        with tempfile.TemporaryDirectory() as tmp:
            self.check_sink([nc, "-l", "-N", "127.0.0.1", str(port)], port,
                            os.path.join(tmp, "out"))

    def test_into_socat(self):
        socat = require_tool(self, "socat")
        port = free_port()
        with tempfile.TemporaryDirectory() as tmp:
            self.check_sink([socat, "-u", "TCP-LISTEN:%d,bind=127.0.0.1,"
                             "reuseaddr" % port, "STDOUT"], port,
                            os.path.join(tmp, "out"))

    def test_into_rsyslog_imtcp(self):
        rsyslog = Rsyslog(self)
        try:
            self.send(rsyslog.port)
            want = b"rsyslog-ready\n" + b"\n".join(EVENTS) + b"\n"
            self.assertEqual(wait_file(rsyslog.file, lambda d: len(d) >=
                                       len(want), "rsyslog's file"), want)
        finally:
            rsyslog.close()

    def wait_port(self, port: int, proc: subprocess.Popen) -> None:
        """Wait for a one-shot listener without connecting to it."""
        deadline = time.monotonic() + TIMEOUT
        hexport = ":%04X " % port
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self.fail("%s exited early" % proc.args[0])
            with open("/proc/net/tcp") as f:
                if any(hexport in line and " 0A " in line for line in f):
                    return
            time.sleep(0.02)
        self.fail("nothing listens on %d" % port)


if __name__ == "__main__":
    unittest.main()
