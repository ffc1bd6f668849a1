"""Run the scripts as a user does, with every wait bounded."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import unittest
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LISTENER = ROOT / "listen_events_cybertrace.py"
SENDER = ROOT / "send_events_cybertrace.py"
TIMEOUT = 15.0

sys.path.insert(0, str(ROOT))

# A suite started in the background (cmd &, nohup, some CI runners) inherits
# SIGINT ignored, and so would every script it starts: then the tests' Ctrl+C
# would do nothing.  A handler, unlike SIG_IGN, is reset by exec.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

import fake_cybertrace  # noqa: E402 (found through the path above)

# The tutorial's four example events, from its output section.
# flake8: noqa: E501
TUTORIAL_EVENTS = [
    "- category=KL_Malicious_Hash_MD5 matchedIndicator=776735A8CA96DB15B422879DA599F474 url=- src=- ip=- md5=776735A8CA96DB15B422879DA599F474 sha1=- sha256=- usrName=- confidence=100 MD5=776735A8CA96DB15B422879DA599F474 SHA1=3B66A1D70562E291DA023E87B349DD89DFE00213 SHA256=1963CBCBB9FDAAD45F782FAAA467EE2C115C3111C003AE14D01181880B03F6ED file_size=1431 first_seen=10.07.2015 23:53 last_seen=14.07.2020 13:35 popularity=1 threat=HEUR:Trojan.Win32.Generic",
    "- category=KL_IP_Reputation matchedIndicator=192.0.2.1 url=- src=- ip=192.0.2.1 md5=- sha1=- sha256=- usrName=- confidence=100 category=test first_seen=01.01.2017 00:00 ip=192.0.2.1 ip_geo=ru last_seen=17.07.2020 09:02 popularity=1 threat_score=75",
    "- category=KL_Malicious_Hash_MD5 matchedIndicator=FEAF2058298C1E174C2B79AFFC7CF4DF url=- src=- ip=- md5=FEAF2058298C1E174C2B79AFFC7CF4DF sha1=- sha256=- usrName=- confidence=100 MD5=FEAF2058298C1E174C2B79AFFC7CF4DF SHA1=D01D17F6B13C7255A234F558ED85078EA5DD3F3D SHA256=4CA914C9791CF2BF2AC69F9A2B21006F0361E247F2CE92F0A9F166DBC6B43670 file_size=1989 first_seen=10.07.2015 23:53 last_seen=14.07.2020 13:35 popularity=1 threat=HEUR:Trojan.Win32.Generic",
    "- category=KL_IP_Reputation matchedIndicator=192.0.2.3 url=- src=- ip=192.0.2.3 md5=- sha1=- sha256=- usrName=- confidence=100 category=test first_seen=15.01.2017 00:00 ip=192.0.2.3 ip_geo=ru last_seen=17.07.2020 08:51 popularity=1 threat_score=75",
]


def reference_framing(data: bytes, size: int) -> list:
    """Return the events of data: split on \\n, \\r before it dropped,
    the last one kept without \\n, each cut into pieces of size bytes."""
    events = data.split(b"\n")
    last = events.pop()
    events = [e[:-1] if e.endswith(b"\r") else e for e in events]
    if last:
        events.append(last)
    out = []
    for event in events:
        out.extend([event[i:i + size] for i in range(0, len(event), size)]
                   or [b""])
    return out


def wait_until(predicate, timeout: float = TIMEOUT, what: str = "",
               seen=None) -> None:
    """Wait until predicate() holds, polling; fail with seen() if not.

    For state that another thread or process changes without telling us
    (a stand-in server's records): never assert on it once, right after
    waiting for something else.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError("timed out waiting for %s%s" % (
                what or predicate, "; saw %r" % (seen(),) if seen else ""))
        time.sleep(0.01)


def user_env() -> dict:
    """Return the environment of a user's shell: no PYTHONUNBUFFERED, and
    bytecode cached as Python does by default (the scripts start a few
    hundred times; compiling the listener each time costs 20 ms)."""
    env = dict(os.environ)
    env.pop("PYTHONUNBUFFERED", None)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def run_sender(*args: str, stdin: bytes = b"", timeout: float = TIMEOUT):
    """Run the sender to its end; return the completed process."""
    return subprocess.run([sys.executable, str(SENDER), *args], input=stdin,
                          capture_output=True, timeout=timeout,
                          env=user_env())


class RecordingStandIn(fake_cybertrace.FakeCyberTrace):
    """The stand-in, keeping every byte each connection sent, and quick to
    close a connection a test left idle."""

    def __init__(self, **settings) -> None:
        settings.setdefault("record", True)
        settings.setdefault("idle_timeout", 15)
        super().__init__(**settings)


def address(server) -> str:
    """Return a test server's address as --connect takes it."""
    return "%s:%d" % server.address


def require_tool(test: unittest.TestCase, name: str) -> str:
    """Return the tool's path; skip without it, fail without it under CI."""
    # Daemons live in sbin, which a CI job's PATH may leave out.
    path = shutil.which(name, path=os.pathsep.join(
        [os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))
    if path is None:
        if os.environ.get("CI") == "true":
            test.fail("%s is missing: .ci/run should install it" % name)
        test.skipTest("%s is not installed" % name)
    return path


class Process:
    """A script in a subprocess; threads collect its stdout and stderr."""

    def __init__(self, argv: list, stdin=subprocess.DEVNULL,
                 stdout=subprocess.PIPE, env: dict | None = None,
                 stderr=subprocess.PIPE) -> None:
        self.proc = subprocess.Popen(argv, stdin=stdin, stdout=stdout,
                                     stderr=stderr, env=env or user_env())
        self.out = bytearray()
        self.err = bytearray()
        self.cond = threading.Condition()
        self.threads = []
        self.ended = 0  # pipes at end of file
        for pipe, buf in ((self.proc.stdout, self.out),
                          (self.proc.stderr, self.err)):
            if pipe is not None:
                thread = threading.Thread(target=self._collect,
                                          args=(pipe, buf), daemon=True)
                thread.start()
                self.threads.append(thread)

    def _collect(self, pipe, buf: bytearray) -> None:
        while True:
            data = os.read(pipe.fileno(), 65536)
            with self.cond:
                buf += data
                self.ended += not data
                self.cond.notify_all()
            if not data:
                return

    def wait_for(self, predicate, timeout: float = TIMEOUT, what: str = ""):
        """Wait until predicate() holds; fail with what was seen if not."""
        deadline = time.monotonic() + timeout
        with self.cond:
            # Output wakes us at once; other conditions (a file's size) are
            # polled every few milliseconds.
            while not predicate():
                left = deadline - time.monotonic()
                # A process that closed its output (it crashed, say) will
                # not change its mind: fail now, not at the deadline.
                if self.ended == len(self.threads) and self.proc.poll() \
                        is not None:
                    left = 0
                if left > 0:
                    self.cond.wait(min(left, 0.02))
                    continue
                raise AssertionError("gave up waiting for %s; stdout=%r "
                                     "stderr=%r" % (what or predicate,
                                                    bytes(self.out[-2000:]),
                                                    bytes(self.err[-2000:])))

    def wait_stderr(self, pattern: str, timeout: float = TIMEOUT):
        """Wait for a stderr match of the regular expression; return it."""
        found = []

        def match():
            found[:] = [re.search(pattern, self.err.decode("utf-8",
                                                           "replace"))]
            return found[0] is not None
        self.wait_for(match, timeout, "stderr matching %r" % pattern)
        return found[0]

    def wait_stdout(self, count: int, timeout: float = TIMEOUT) -> None:
        """Wait until stdout holds count newlines."""
        self.wait_for(lambda: self.out.count(b"\n") >= count, timeout,
                      "%d lines on stdout" % count)

    def signal(self, number: int) -> None:
        self.proc.send_signal(number)

    def finish(self, timeout: float = TIMEOUT) -> int:
        """Wait for the exit and the last output; return the exit status."""
        try:
            status = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout)
            raise AssertionError("process did not exit; stderr=%r"
                                 % bytes(self.err[-2000:]))
        for thread in self.threads:
            thread.join(timeout)
        return status

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(TIMEOUT)
        for thread in self.threads:
            thread.join(TIMEOUT)
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def stderr_text(self) -> str:
        return self.err.decode("utf-8", "replace")


class Listener(Process):
    """The listener on a free loopback port; .address is where it listens."""

    def __init__(self, *args: str, listen: str = "127.0.0.1:0", **kwargs):
        super().__init__([sys.executable, str(LISTENER), "-l", listen,
                          *args], **kwargs)
        try:
            found = self.wait_stderr(
                r"Starting on \[?([^\]\s]+?)\]?:(\d+)(?:\r?\n| \()")
        except AssertionError:
            self.close()
            raise
        self.address = (found.group(1), int(found.group(2)))

    def connect(self) -> socket.socket:
        return socket.create_connection(self.address, timeout=TIMEOUT)

    def address_args(self) -> list:
        """Return [host, port] as a command line such as nc's wants them."""
        return [self.address[0], str(self.address[1])]

    def send(self, *chunks: bytes) -> None:
        """Send chunks on one connection and close it."""
        with self.connect() as sock:
            for chunk in chunks:
                sock.sendall(chunk)

    def stop(self, number: int = signal.SIGTERM) -> int:
        self.signal(number)
        return self.finish()


def queue_peers(listener: Listener, count: int) -> list:
    """Connect count peers that each send an event and a partial one."""
    sockets = []
    for index in range(count):
        sock = listener.connect()
        sock.sendall(b"queued %d\nqueued partial %d" % (index, index))
        sockets.append(sock)
    return sockets


def reset(sock: socket.socket) -> None:
    """Close sock with a TCP reset instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                    struct.pack("ii", 1, 0))
    sock.close()
