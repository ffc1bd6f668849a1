"""Both scripts on a real Windows Python: run by tests/windows/run.py.

run.py starts this module under wine with the official embeddable CPython
(python.exe), after it ran the same capture() on Linux into a reference
folder (CYBERTRACE_LINUX_REFERENCE), so that every format is compared
byte for byte with the Linux run.  Each script runs as a Windows process
of that python.exe; the test's sockets are Windows sockets too.

What wine cannot do is skipped with the exact reason; everything else is
a real check.  Not part of `unittest discover -s tests` (this folder is no
package): it needs Windows.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent.parent)]

from fake_cybertrace import FakeCyberTrace  # noqa: E402
from test_check import STAND_IN, StandIn, free_port  # noqa: E402
from support import (TUTORIAL_EVENTS, LISTENER, SENDER, TIMEOUT,  # noqa: E402
                     Listener, Process, user_env)

WINDOWS = os.name == "nt"
FORMATS = ("text", "raw", "json")
REFERENCE = os.environ.get("CYBERTRACE_LINUX_REFERENCE")
CTRL_C_EVENT, CTRL_BREAK_EVENT = 0, 1
# A sender still busy when the test interrupts it: 1,000 events at 20/s.
SLOW_SEND = ["-e", "slow event", "--repeat", "1000", "--rate", "20"]
# Raw pipe clients started in the same instant, five times over.
CLIENTS_AT_ONCE = 32

# Each peer's events, sent on a connection of its own, one peer after the
# other so that the output's order is fixed.  They hold what a platform
# could mangle: \r\n, bytes that are not UTF-8, controls, quotes and
# backslashes for JSON, non-ASCII text, a long event, and a last event
# without its newline.
PEERS = [
    [TUTORIAL_EVENTS[0].encode() + b"\r\n",
     TUTORIAL_EVENTS[1].encode() + b"\n"],
    [b'quote " and backslash \\ key=va"l\\ue\n',
     b"not UTF-8 \xff\xfe key=\xc3(\n",
     b"ESC \x1b[31m BEL \x07 key=v\r\n",
     "Привет key=значение | k2=v2\n".encode()],
    [b"x" * 200000 + b" key=long\n", b"last without newline key=1"],
]
EVENTS = sum(len(events) for events in PEERS)
LINES_PER_EVENT = {"text": 2, "raw": 1, "json": 1}
JSON_HEAD = re.compile(rb'^\{"time":"(\d{4}-\d\d-\d\dT[\d:]{8}\.\d{3}Z)",'
                       rb'"peer":"127\.0\.0\.1:(\d+)",'
                       rb'"listen":"127\.0\.0\.1:\d+"', re.M)


def is_wine() -> bool:
    """Tell whether this Windows is wine."""
    try:
        import ctypes
        return hasattr(ctypes.WinDLL("ntdll"), "wine_get_version")
    except (ImportError, OSError, AttributeError):
        return False


def send_peers(listener: Listener, lines_per_event: int,
               path: str | None = None) -> list:
    """Send PEERS in turn, each once printed; return their local ports."""
    ports = []
    done = 0
    for events in PEERS:
        with listener.connect() as sock:
            ports.append(sock.getsockname()[1])
            sock.sendall(b"".join(events))
        done += len(events) * lines_per_event
        if path is None:
            listener.wait_stdout(done)
        else:
            listener.wait_for(lambda: os.path.exists(path) and
                              read(path).count(b"\n") >= done,
                              what="%d lines in %s" % (done, path))
    return ports


def read(path: str) -> bytes:
    with open(path, "rb") as file:
        return file.read()


def normalize_json(out: bytes, ports: list) -> bytes:
    """Put the n-th peer as PEERn, the reception time as TIME and the
    listening address (its port 0 picked anew) as LISTEN."""
    def replace(found):
        port = int(found.group(2))
        peer = b"PEER%d" % ports.index(port) if port in ports else \
            found.group(0)
        return b'{"time":"TIME","peer":"' + peer + b'","listen":"LISTEN"'
    return JSON_HEAD.sub(replace, out)


def capture(fmt: str, to_file: bool = False) -> tuple:
    """Run the listener on PEERS in fmt; return (stdout, stderr, status)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "events.out") if to_file else None
        args = ["-f", fmt, "-n", str(EVENTS)]
        with Listener(*args, *(["-o", path] if path else [])) as listener:
            ports = send_peers(listener, LINES_PER_EVENT[fmt], path)
            status = listener.finish()
            out = read(path) if path else bytes(listener.out)
            err = listener.stderr_text
    if fmt == "json":
        out = normalize_json(out, ports)
    return out, err, status


def write_reference(folder: str) -> None:
    """Write capture()'s output of each format into folder (the Linux run)."""
    os.makedirs(folder, exist_ok=True)
    for fmt in FORMATS:
        out, err, status = capture(fmt)
        if status != 0:
            raise SystemExit("reference run of -f %s failed: %s" % (fmt, err))
        with open(os.path.join(folder, fmt + ".out"), "wb") as file:
            file.write(out)


def console_info(fd: int):
    """Return the console's screen buffer info and its handle."""
    import ctypes
    import msvcrt
    from ctypes import wintypes

    class Info(ctypes.Structure):
        _fields_ = [("size", wintypes._COORD), ("cursor", wintypes._COORD),
                    ("attributes", wintypes.WORD),
                    ("window", wintypes.SMALL_RECT),
                    ("maximum", wintypes._COORD)]
    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
    handle = wintypes.HANDLE(msvcrt.get_osfhandle(fd))
    info = Info()
    if not kernel32.GetConsoleScreenBufferInfo(handle, ctypes.byref(info)):
        raise ctypes.WinError(ctypes.get_last_error())
    return info, handle, kernel32


def console_cursor_row(fd: int) -> int:
    return console_info(fd)[0].cursor.Y


def console_text(fd: int, row: int) -> str:
    """Return what the console shows from row to its cursor's row."""
    import ctypes
    from ctypes import wintypes
    info, handle, kernel32 = console_info(fd)
    width = info.size.X
    text = []
    for line in range(row, info.cursor.Y + 1):
        cells = ctypes.create_unicode_buffer(width)
        read = wintypes.DWORD()
        if not kernel32.ReadConsoleOutputCharacterW(
                handle, cells, width, wintypes._COORD(0, line),
                ctypes.byref(read)):
            raise ctypes.WinError(ctypes.get_last_error())
        text.append(cells[:read.value].rstrip())
    return "".join(text).rstrip()


def run_script(script: Path, *args: str, timeout: float = TIMEOUT):
    return subprocess.run([sys.executable, str(script), *args],
                          stdin=subprocess.DEVNULL, capture_output=True,
                          timeout=timeout, env=user_env())


def setUpModule():
    if not WINDOWS:
        raise unittest.SkipTest("needs Windows: run tests/windows/run.py")
    # Console events reach every process on the console, this one too.
    signal.signal(signal.SIGINT, lambda *_: None)
    signal.signal(signal.SIGBREAK, lambda *_: None)


def tearDownModule():
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGBREAK, signal.SIG_DFL)


class WindowsTest(unittest.TestCase):

    def assertNoTraceback(self, stderr) -> None:
        if isinstance(stderr, str):
            stderr = stderr.encode()
        self.assertNotIn(b"Traceback", stderr)

    def assertOneErrorLine(self, done, status: int, pattern: bytes) -> None:
        self.assertEqual(done.returncode, status, done.stderr)
        self.assertNoTraceback(done.stderr)
        self.assertRegex(done.stderr, pattern)
        if status == 1:
            self.assertEqual(done.stderr.count(b"\n"), 1, done.stderr)

    def console_event(self, event: int) -> None:
        """Send a console control event to every process on the console."""
        import ctypes
        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
        if not kernel32.GetConsoleWindow() and \
                not kernel32.GetConsoleOutputCP():
            self.skipTest("no console to send Ctrl+C on: run this module "
                          "through tests/windows/run.py (it gives wine one)")
        if not kernel32.GenerateConsoleCtrlEvent(event, 0):
            error = ctypes.get_last_error()
            if is_wine():
                self.skipTest("wine cannot generate this console event "
                              "(GenerateConsoleCtrlEvent(%d, 0) fails with "
                              "%s); the signal path is tested with "
                              "signal.raise_signal" % (event,
                                                       ctypes.FormatError(
                                                           error)))
            raise ctypes.WinError(error)


class ListenerTest(WindowsTest):

    def test_formats_are_byte_identical_to_linux(self):
        if REFERENCE is None:
            if os.environ.get("CI") == "true":
                self.fail("CYBERTRACE_LINUX_REFERENCE is not set: run "
                          "this module through tests/windows/run.py")
            self.skipTest("no Linux run to compare with: run this module "
                          "through tests/windows/run.py")
        for fmt in FORMATS:
            with self.subTest(format=fmt):
                out, err, status = capture(fmt)
                self.assertEqual(status, 0, err)
                self.assertIn("Stopped: %d events" % EVENTS, err)
                self.assertNoTraceback(err)
                expected = read(os.path.join(REFERENCE, fmt + ".out"))
                self.assertEqual(out.count(b"\n"),
                                 EVENTS * LINES_PER_EVENT[fmt])
                self.assertEqual(out, expected)
        with self.subTest(output="-o FILE"):
            out, err, status = capture("raw", to_file=True)
            self.assertEqual(status, 0, err)
            self.assertEqual(out, read(os.path.join(REFERENCE, "raw.out")))

    def test_count_stops_at_once_and_timeout_reports(self):
        with Listener("-f", "raw", "-n", "2", "-t", "60") as listener:
            listener.send(b"one\ntwo\nthree\n")
            self.assertEqual(listener.finish(), 0)
            self.assertEqual(bytes(listener.out), b"one\ntwo\n")
            self.assertIn("Stopped: 2 events", listener.stderr_text)
        with Listener("-f", "raw", "-n", "5", "-t", "1") as listener:
            listener.send(b"only one\n")
            self.assertEqual(listener.finish(), 1)
            self.assertIn("timeout: received 1 of 5 events",
                          listener.stderr_text)
        with Listener("-t", "0.5") as listener:
            self.assertEqual(listener.finish(), 0)
            self.assertIn("Stopped: 0 events", listener.stderr_text)

    def stop_with(self, stop) -> None:
        with Listener("-f", "raw") as listener:
            for peer in range(3):
                listener.send(b"peer %d one\r\npeer %d two\n"
                              % (peer, peer))
            listener.wait_stdout(6)
            with listener.connect() as held:
                held.sendall(b"still open\n")
                listener.wait_stdout(7)
                stop(listener)
                self.assertEqual(listener.finish(), 0)
            self.assertIn("Stopped: 7 events", listener.stderr_text)
            self.assertNoTraceback(listener.err)
            self.assertEqual(sorted(bytes(listener.out).split(b"\n")),
                             sorted([b""] + [b"peer %d %s" % (p, w)
                                             for p in range(3)
                                             for w in (b"one", b"two")] +
                                    [b"still open"]))

    def test_ctrl_c_stops_with_the_summary(self):
        self.stop_with(lambda _: self.console_event(CTRL_C_EVENT))

    def test_ctrl_break_stops_with_the_summary(self):
        self.stop_with(lambda _: self.console_event(CTRL_BREAK_EVENT))

    def test_sigint_and_sigbreak_stop_through_the_wakeup_socket(self):
        # The listener's own stop path, driven from inside: the handler
        # that install_signals() set gets the signal, as from a console.
        for name in ("SIGINT", "SIGBREAK"):
            with self.subTest(signal=name):
                code = ("import sys, threading, signal\n"
                        "import listen_events_cybertrace as lec\n"
                        "def stop():\n"
                        "    sys.stdin.readline()\n"
                        "    signal.raise_signal(signal.%s)\n"
                        "threading.Thread(target=stop, daemon=True).start()\n"
                        "sys.exit(lec.main(['-l', '127.0.0.1:0', '-f', "
                        "'raw']))\n" % name)
                with Process([sys.executable, "-c", code],
                             stdin=subprocess.PIPE) as proc:
                    found = proc.wait_stderr(r"Starting on [\d.]+:(\d+)")
                    address = ("127.0.0.1", int(found.group(1)))
                    with socket.create_connection(address, TIMEOUT) as sock:
                        sock.sendall(b"before stop\n")
                    proc.wait_stdout(1)
                    proc.proc.stdin.write(b"stop\n")
                    proc.proc.stdin.flush()
                    self.assertEqual(proc.finish(), 0, proc.stderr_text)
                    self.assertEqual(bytes(proc.out), b"before stop\n")
                    self.assertIn("Stopped: 1 event,", proc.stderr_text)

    def test_a_console_shows_unicode_and_controls_escaped(self):
        try:
            console = os.open("CONOUT$", os.O_RDWR)
        except OSError as exc:
            self.skipTest("no console here (%s): run this module through "
                          "tests/windows/run.py" % exc)
        try:
            start = console_cursor_row(console)
            with Listener("-f", "raw", "-n", "1", stdout=console) as listener:
                listener.send("Привет ESC \x1b[31m red BEL \x07 end\n"
                              .encode())
                self.assertEqual(listener.finish(), 0, listener.stderr_text)
            # What the console shows, read back from its screen buffer.
            self.assertEqual(console_text(console, start),
                             "Привет ESC \\x1b[31m red BEL \\x07 end")
        finally:
            os.close(console)

    def test_listening_on_every_interface(self):
        with Listener("-t", "0.5", listen="0.0.0.0:0") as listener:
            self.assertEqual(listener.finish(), 0)
            listener.wait_stderr(r"Waiting for CyberTrace")
            self.assertNoTraceback(listener.err)

    def test_help_says_what_windows_lacks(self):
        done = run_script(LISTENER, "--help")
        self.assertEqual(done.returncode, 0)
        text = b" ".join(done.stdout.split())
        self.assertIn(b"Windows has neither", text)
        self.assertIn(b"SIGUSR1 prints one at once (not on Windows)", text)
        self.assertIn(b"Ctrl+Break", text)

    def test_max_connections_capped_to_what_select_watches(self):
        with Listener("--max-connections", "1000", "-t", "0.5") as listener:
            self.assertEqual(listener.finish(), 0)
            self.assertIn("warning: --max-connections 1000: select() here "
                          "watches at most 510 connections",
                          listener.stderr_text)

    def test_one_peer_more_than_select_watches_waits_its_turn(self):
        with Listener("-f", "raw") as listener:
            socks = []
            try:
                # One more than select() may watch: the last one waits.
                for index in range(511):
                    sock = listener.connect()
                    socks.append(sock)
                    sock.sendall(b"peer %d\n" % index)
                listener.wait_stderr(r"warning: 510 connections open")
                listener.wait_stdout(510)
                socks.pop(0).close()
                listener.wait_stdout(511)
            finally:
                for sock in socks:
                    sock.close()
            listener.signal(signal.SIGTERM)
            listener.finish()
            self.assertNotIn("--max-connections 512", listener.stderr_text)
            self.assertNoTraceback(listener.err)

    def test_port_in_use_and_bad_addresses(self):
        with socket.create_server(("127.0.0.1", 0)) as taken:
            port = taken.getsockname()[1]
            done = run_script(LISTENER, "-l", "127.0.0.1:%d" % port)
            self.assertOneErrorLine(done, 1, rb"error: cannot listen on "
                                    rb"127\.0\.0\.1:%d: " % port)
        done = run_script(LISTENER, "-l", "192.0.2.1:0")
        self.assertOneErrorLine(done, 1, rb"error: cannot listen on "
                                rb"192\.0\.2\.1:0: ")
        for bad in ("nonsense", "127.0.0.1:99999", "[::1:9998"):
            with self.subTest(address=bad):
                done = run_script(LISTENER, "-l", bad)
                self.assertOneErrorLine(done, 2, rb"error: argument -l")
        done = run_script(SENDER, "-c", "127.0.0.1:%d" % port, "-e", "x")
        self.assertOneErrorLine(done, 1, rb"error: cannot connect to ")
        done = run_script(SENDER, "-c", "nonsense")
        self.assertOneErrorLine(done, 2, rb"error: argument -c")


class SenderTest(WindowsTest):

    def interrupt_sender(self, command: list, stop) -> None:
        """Run command (a sender), stop(process) mid-send, check its line."""
        received = bytearray()
        with socket.create_server(("127.0.0.1", 0)) as server:
            where = "127.0.0.1:%d" % server.getsockname()[1]
            command = [arg.replace("WHERE", where) for arg in command]
            with Process(command, stdin=subprocess.PIPE,
                         stdout=subprocess.DEVNULL) as sender:
                server.settimeout(TIMEOUT)
                peer, _ = server.accept()
                with peer:
                    peer.settimeout(TIMEOUT)
                    while received.count(b"\n") < 3:
                        data = peer.recv(65536)
                        self.assertTrue(data, sender.stderr_text)
                        received += data
                    stop(sender)
                    self.assertEqual(sender.finish(), 130, sender.stderr_text)
        found = re.search(r"send_events_cybertrace\.py: interrupted: (\d+) "
                          r"events? sent, (\d+) acknowledged",
                          sender.stderr_text)
        self.assertIsNotNone(found, sender.stderr_text)
        self.assertGreaterEqual(int(found.group(1)), 3)
        self.assertNoTraceback(sender.err)

    def test_ctrl_c_stops_the_sender_with_its_counts(self):
        self.interrupt_sender(
            [sys.executable, str(SENDER), "-c", "WHERE", *SLOW_SEND],
            lambda _: self.console_event(CTRL_C_EVENT))

    def test_sigbreak_stops_the_sender_as_ctrl_c_does(self):
        # What Ctrl+Break raises, which wine cannot send from a console.
        code = ("import sys, threading, signal\n"
                "import send_events_cybertrace as sec\n"
                "def stop():\n"
                "    sys.stdin.readline()\n"
                "    signal.raise_signal(signal.SIGBREAK)\n"
                "threading.Thread(target=stop, daemon=True).start()\n"
                "sys.argv[0] = 'send_events_cybertrace.py'\n"
                "sys.exit(sec.main(%r))\n" % (["-c", "WHERE", *SLOW_SEND],))

        def stop(sender):
            sender.proc.stdin.write(b"stop\n")
            sender.proc.stdin.flush()
        self.interrupt_sender([sys.executable, "-c", code], stop)

    def test_file_event_and_demo_reach_the_listener(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "events.log")
            with open(path, "wb") as file:
                file.write(b"from a file\r\n\r\nits second line\n")
            with Listener("-f", "raw") as listener:
                where = "%s:%d" % listener.address
                for args, count in (([path], 2), (["-e", "one event"], 1),
                                    (["--demo"], 17)):
                    done = run_script(SENDER, "-c", where, *args)
                    self.assertEqual(done.returncode, 0, done.stderr)
                    self.assertRegex(done.stderr,
                                     rb"^Sent %d events?\b" % count)
                listener.wait_stdout(20)
                listener.signal(signal.SIGTERM)
                listener.finish()
                lines = bytes(listener.out).split(b"\n")
        self.assertEqual(lines[:3], [b"from a file", b"its second line",
                                     b"one event"])
        self.assertEqual(sum(b"cybertrace-demo" in x for x in lines), 17)

    def test_ping_and_reply_back_against_the_stand_in(self):
        with FakeCyberTrace() as ct:
            where = "%s:%d" % ct.address
            done = run_script(SENDER, "--ping", "-c", where)
            self.assertEqual(done.returncode, 0, done.stderr)
            self.assertRegex(done.stderr, rb"^PONG from ")
            done = run_script(SENDER, "--demo", "--reply-back", "-c", where)
            self.assertEqual(done.returncode, 0, done.stderr)
            self.assertEqual(done.stdout.count(b"LookupFinished"), 17)
            self.assertEqual(done.stdout.count(b"matchedIndicator="), 17)
            self.assertNotIn(b"\r\n", done.stdout)
        with FakeCyberTrace(pong=b"") as ct:
            done = run_script(SENDER, "--ping", "-c", "%s:%d" % ct.address)
            self.assertOneErrorLine(done, 1, rb"error: no PONG from ")

    def test_lab_check_against_the_stand_in(self):
        port = free_port()
        with StandIn("--detect-all", "--output",
                     "127.0.0.1:%d" % port) as stand_in:
            done = run_script(SENDER, "--check", str(port), "-c",
                              "127.0.0.1:%d" % stand_in.port)
            self.assertNoTraceback(stand_in.err)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertRegex(done.stdout, rb"(?m)^17 of 17 test indicators "
                         rb"detected and delivered to 127\.0\.0\.1:%d "
                         % port)
        self.assertNoTraceback(done.stderr)


_pipes = iter(range(1, 1000))


def pipe_name(what: str) -> str:
    """Return a pipe name no other test or run uses."""
    return "\\\\.\\pipe\\cybertrace-test-%d-%s-%d" % (os.getpid(), what,
                                                     next(_pipes))


class PipeProcess(Process):
    """A script serving a named pipe, once it says it does."""

    def __init__(self, argv: list, ready: str, **kwargs) -> None:
        super().__init__(argv, **kwargs)
        try:
            self.wait_stderr(ready)
        except AssertionError:
            self.close()
            raise


def pipe_listener(name: str, *args: str, **kwargs) -> PipeProcess:
    return PipeProcess([sys.executable, str(LISTENER), "-l", name, *args],
                       r"Waiting for CyberTrace \(OutputSettings > "
                       r"ConnectionString = %s\)" % re.escape(name), **kwargs)


def pipe_stand_in(*args: str) -> PipeProcess:
    return PipeProcess([sys.executable, "-X", "dev", "-W", "error",
                        str(STAND_IN), *args], r"Listening on \\\\\.\\pipe")


class RawPipe:
    """A pipe client on _winapi alone, blocking, as a C program is: a
    write returns once the pipe holds its bytes."""

    def __init__(self, name: str) -> None:
        import _winapi
        self.handle = _winapi.CreateFile(
            name, _winapi.GENERIC_WRITE, 0, _winapi.NULL,
            _winapi.OPEN_EXISTING, 0, _winapi.NULL)

    def write(self, data: bytes) -> None:
        import _winapi
        view = memoryview(data)
        while view:
            written, err = _winapi.WriteFile(self.handle, view.tobytes())
            view = view[written:]

    def close(self) -> None:
        import _winapi
        _winapi.CloseHandle(self.handle)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class PipeTest(WindowsTest):
    """Named pipes: the listener, the sender, the stand-in and the check."""

    def test_pipe_clients_one_after_another_byte_identical_to_linux(self):
        if REFERENCE is None:
            self.skipTest("no Linux run to compare with: run this module "
                          "through tests/windows/run.py")
        for fmt in ("raw", "text"):
            with self.subTest(format=fmt):
                name = pipe_name("formats")
                with pipe_listener(name, "-f", fmt, "-n",
                                   str(EVENTS)) as listener:
                    done = 0
                    for events in PEERS:
                        with RawPipe(name) as pipe:
                            pipe.write(b"".join(events))
                        done += len(events) * LINES_PER_EVENT[fmt]
                        listener.wait_stdout(done)
                    self.assertEqual(listener.finish(), 0,
                                     listener.stderr_text)
                self.assertEqual(bytes(listener.out), read(
                    os.path.join(REFERENCE, fmt + ".out")))
                err = listener.stderr_text
                for client in (1, 2, 3):
                    self.assertRegex(err, r"(?m)^Connection from %s client "
                                     r"%d\r?$" % (re.escape(name), client))
                self.assertIn("Closed %s client 3: 2 events" % name, err)
                self.assertIn("Stopped: %d events" % EVENTS, err)
                self.assertNoTraceback(err)

    def send_files(self, name: str, files: list, at_once: bool) -> None:
        """Run a sender per file, all at once or one after another."""
        def start(path):
            return Process([sys.executable, str(SENDER), "-c", name, path])
        senders = []
        try:
            for path in files:
                senders.append(start(path))
                if not at_once:
                    self.assertEqual(senders[-1].finish(), 0,
                                     senders[-1].stderr_text)
            for sender in senders:
                self.assertEqual(sender.finish(), 0, sender.stderr_text)
                self.assertRegex(sender.stderr_text, r"^Sent 500 events\b")
        finally:
            for sender in senders:
                sender.close()

    def test_senders_at_once_and_in_turn_byte_exact(self):
        name = pipe_name("senders")
        with tempfile.TemporaryDirectory() as tmp:
            files, expected = [], []
            for number in range(6):
                lines = [b"sender %d event %d key=%s | x=\"\\q\" \xd0\x96"
                         % (number, index, b"v" * (index % 300))
                         for index in range(500)]
                expected.append(lines)
                files.append(os.path.join(tmp, "events%d.log" % number))
                with open(files[-1], "wb") as file:
                    file.write(b"\r\n".join(lines) + b"\r\n")
            with pipe_listener(name, "-f", "raw", "-n", "3000") as listener:
                self.send_files(name, files[:3], at_once=True)
                listener.wait_stdout(1500)
                self.send_files(name, files[3:], at_once=False)
                self.assertEqual(listener.finish(), 0, listener.stderr_text)
        got = bytes(listener.out).split(b"\n")
        self.assertEqual(got[-1], b"")
        for number, lines in enumerate(expected):
            mine = [line for line in got
                    if line.startswith(b"sender %d " % number)]
            self.assertEqual(mine, lines)  # whole, once, in order
        self.assertEqual(len(got) - 1, 3000)
        err = listener.stderr_text
        self.assertEqual(err.count("Connection from %s client " % name), 6)
        self.assertIn("Stopped: 3,000 events", err)
        self.assertNoTraceback(err)

    def test_clients_at_once_never_find_the_pipe_busy(self):
        # Raw clients do not wait on ERROR_PIPE_BUSY as the sender does:
        # an instance must be free for each, however they come together.
        import threading
        name = pipe_name("burst")
        with pipe_listener(name, "-f", "raw") as listener:
            failures = []

            def client(start, line):
                start.wait(TIMEOUT)
                try:
                    with RawPipe(name) as pipe:
                        pipe.write(line)
                except OSError as exc:
                    failures.append(exc)
            for round in range(5):
                start = threading.Event()
                threads = [threading.Thread(target=client, args=(
                    start, b"round %d client %d\n" % (round, n)))
                    for n in range(CLIENTS_AT_ONCE)]
                for thread in threads:
                    thread.start()
                start.set()
                for thread in threads:
                    thread.join(TIMEOUT)
                self.assertEqual(failures, [])
                listener.wait_stdout(CLIENTS_AT_ONCE * (round + 1))
            listener.signal(signal.SIGTERM)
            listener.finish()
        self.assertEqual(sorted(bytes(listener.out).split(b"\n")[:-1]),
                         sorted(b"round %d client %d" % (r, n)
                                for r in range(5) for n in range(CLIENTS_AT_ONCE)))

    def test_json_to_a_file_with_stats_and_count_over_a_pipe(self):
        import json
        name = pipe_name("json")
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "events.jsonl")
            with pipe_listener(name, "-f", "json", "-o", path, "--stats",
                               "0.2", "-n", "4") as listener:
                with RawPipe(name) as pipe:
                    pipe.write(b"one key=1\ntwo key=2\nthree key=3\n")
                    listener.wait_for(lambda: len(re.findall(
                        r"Stats after \S+ s: 3 events, 32 bytes received, "
                        r"[\d,]+/s over the last \S+ s, 1 connection open",
                        listener.stderr_text)) >= 2, what="two stats lines")
                    pipe.write(b"four key=4\nfive key=5\n")
                    # --count stops it at the fourth, the client connected.
                    self.assertEqual(listener.finish(), 0,
                                     listener.stderr_text)
            events = [json.loads(line) for line in read(path).splitlines()]
        self.assertEqual([e["event"] for e in events],
                         ["one key=1", "two key=2", "three key=3",
                          "four key=4"])
        self.assertEqual({e["peer"] for e in events}, {name + " client 1"})
        self.assertEqual(events[3]["fields"]["key"], "4")
        self.assertIn("Stopped: 4 events", listener.stderr_text)
        self.assertEqual(bytes(listener.out), b"")

    def test_errors_of_pipes_are_one_line(self):
        name = pipe_name("errors")
        done = run_script(SENDER, "-c", name, "-e", "x")
        self.assertOneErrorLine(done, 1, rb"error: cannot connect to "
                                rb"\\\\\.\\pipe\\\S+: no program serves "
                                rb"this pipe")
        with pipe_listener(name, "-t", "30") as first:
            done = run_script(LISTENER, "-l", name, "-t", "1")
            self.assertOneErrorLine(done, 1, rb"error: cannot listen on "
                                    rb"\\\\\.\\pipe\\\S+: another program "
                                    rb"serves this pipe")
            first.signal(signal.SIGTERM)
            first.finish()
        for bad in ("\\\\.\\pipe\\", "\\\\.\\pipe\\a\\b"):
            with self.subTest(address=bad):
                done = run_script(LISTENER, "-l", bad)
                self.assertOneErrorLine(done, 2, rb"error: argument -l")

    def test_stand_in_answers_and_delivers_over_pipes(self):
        into, out = pipe_name("input"), pipe_name("output")
        indicator = re.compile(rb"matchedIndicator=(\S+)")
        # Its start alert and the 3 detections: -n stops it with a summary.
        with pipe_listener(out, "-f", "raw", "-n", "4") as listener, \
                pipe_stand_in("--input", into, "--output", out) as stand_in:
            done = run_script(SENDER, "--ping", "-c", into)
            self.assertEqual(done.returncode, 0, done.stderr)
            self.assertRegex(done.stderr, rb"^PONG from ")
            # Reply-back over the duplex pipe: every answer comes back.
            done = run_script(SENDER, "--demo", "--reply-back", "-c", into)
            self.assertEqual(done.returncode, 0, done.stderr)
            self.assertEqual(done.stdout.count(b"LookupFinished"), 17)
            answered = sorted(indicator.findall(done.stdout))
            self.assertEqual(len(answered), 3, done.stdout)
            # Sent plainly, their detections go to the output: the
            # listener's pipe (after the stand-in's start alert).
            done = run_script(SENDER, "--demo", "-c", into)
            self.assertEqual(done.returncode, 0, done.stderr)
            self.assertEqual(listener.finish(), 0, listener.stderr_text)
            stand_in.signal(signal.SIGTERM)
            stand_in.finish()
            self.assertNoTraceback(stand_in.err)
        delivered = bytes(listener.out).split(b"\n")[:-1]
        self.assertIn(b"alert=KL_ALERT_ServiceStarted", delivered[0])
        self.assertEqual(sorted(indicator.search(line).group(1)
                                for line in delivered[1:]), answered)
        self.assertRegex(listener.stderr_text, r"(?m)^Connection from %s "
                         r"client 1\r?$" % re.escape(out))

    def test_stand_in_sends_alerts_to_their_own_pipe(self):
        into, out, alerts = (pipe_name("input"), pipe_name("output"),
                             pipe_name("alerts"))
        with pipe_listener(alerts, "-f", "raw", "-n", "1") as listener, \
                pipe_stand_in("--input", into, "--output", out,
                              "--alert-output", alerts) as stand_in:
            self.assertEqual(listener.finish(), 0, listener.stderr_text)
            stand_in.signal(signal.SIGTERM)
            stand_in.finish()
            self.assertNoTraceback(stand_in.err)
        self.assertRegex(bytes(listener.out),
                         rb"^.* alert=KL_ALERT_ServiceStarted\n$")

    def test_lab_check_on_pipes_gets_3_of_17(self):
        into, out = pipe_name("input"), pipe_name("output")
        with pipe_stand_in("--input", into, "--output", out) as stand_in:
            done = run_script(SENDER, "--check", out, "-c", into)
            stand_in.signal(signal.SIGTERM)
            stand_in.finish()
            self.assertNoTraceback(stand_in.err)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertRegex(done.stdout, rb"(?m)^3 of 17 test indicators "
                         rb"detected and delivered to %s\b"
                         % re.escape(out.encode()))
        self.assertNoTraceback(done.stderr)

    def drain_with(self, stop) -> None:
        """Stop a listener (stop(listener)) right after a pipe client wrote
        more than the pipe holds, the client still connected: every event
        is written, then the summary."""
        name = pipe_name("drain")
        events = [b"drained %d %s\n" % (n, b"y" * 100) for n in range(2000)]
        with pipe_listener(name, "-f", "raw") as listener:
            with RawPipe(name) as pipe:
                pipe.write(b"".join(events))  # returns once the pipe has all
                stop(listener)
                self.assertEqual(listener.finish(), 0, listener.stderr_text)
        self.assertEqual(bytes(listener.out), b"".join(events))
        self.assertIn("Stopped: 2,000 events", listener.stderr_text)
        self.assertNoTraceback(listener.err)

    def test_ctrl_c_drains_a_pipe_client(self):
        self.drain_with(lambda _: self.console_event(CTRL_C_EVENT))

    def test_ctrl_break_drains_a_pipe_client(self):
        self.drain_with(lambda _: self.console_event(CTRL_BREAK_EVENT))

    def test_sigbreak_drains_a_pipe_client(self):
        # What Ctrl+Break raises, from inside (wine cannot send it).
        name = pipe_name("sigbreak")
        code = ("import sys, threading, signal\n"
                "import listen_events_cybertrace as lec\n"
                "def stop():\n"
                "    sys.stdin.readline()\n"
                "    signal.raise_signal(signal.SIGBREAK)\n"
                "threading.Thread(target=stop, daemon=True).start()\n"
                "sys.exit(lec.main(['-l', %r, '-f', 'raw']))\n" % name)
        events = [b"drained %d %s\n" % (n, b"z" * 100) for n in range(2000)]
        with PipeProcess([sys.executable, "-c", code], r"Waiting for",
                         stdin=subprocess.PIPE) as proc:
            with RawPipe(name) as pipe:
                pipe.write(b"".join(events))
                proc.proc.stdin.write(b"stop\n")
                proc.proc.stdin.flush()
                self.assertEqual(proc.finish(), 0, proc.stderr_text)
        self.assertEqual(bytes(proc.out), b"".join(events))
        self.assertIn("Stopped: 2,000 events", proc.stderr_text)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--reference"]:
        write_reference(sys.argv[2])
    else:
        unittest.main()
