"""The listener at a console: what it says, on terminals, pipes and logs."""

from __future__ import annotations

import fcntl
import ipaddress
import os
import pty
import re
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
import unittest
from unittest import mock

from support import LISTENER, TIMEOUT, Listener, Process, user_env

import listen_events_cybertrace as lec

WAITING = (r"Waiting for CyberTrace \(OutputSettings > ConnectionString = "
           r"%s\); Ctrl\+C to stop\n")


class Terminal:
    """A pty for a child's stderr (and stdout, if asked); a thread reads it."""

    def __init__(self, columns: int = 120) -> None:
        self.primary, self.secondary = pty.openpty()
        fcntl.ioctl(self.secondary, termios.TIOCSWINSZ,
                    struct.pack("HHHH", 40, columns, 0, 0))
        self.data = bytearray()
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._collect, daemon=True)
        self.thread.start()

    def _collect(self) -> None:
        while True:
            try:
                data = os.read(self.primary, 65536)
            except OSError:  # EIO: every writer closed the secondary
                data = b""
            with self.cond:
                self.data += data
                self.cond.notify_all()
            if not data:
                return

    def wait_for(self, pattern: bytes, timeout: float = TIMEOUT):
        """Wait for a match of the regular expression; return it."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                found = re.search(pattern, bytes(self.data), re.DOTALL)
                if found:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        "timed out waiting for %r on the terminal; it shows %r"
                        % (pattern, bytes(self.data[-2000:])))
                self.cond.wait(min(left, 0.05))

    def release(self) -> None:
        """Close our copy of the secondary once the child holds its own."""
        if self.secondary is not None:
            os.close(self.secondary)
            self.secondary = None

    def close(self) -> None:
        self.release()
        self.thread.join(TIMEOUT)
        os.close(self.primary)


class TerminalListener:
    """The listener with stderr (and optionally stdout) on a terminal."""

    def __init__(self, *args: str, stdout_on_terminal: bool = False) -> None:
        self.terminal = Terminal()
        stdout = self.terminal.secondary if stdout_on_terminal else \
            subprocess.PIPE
        self.proc = Process([sys.executable, str(LISTENER), "-l",
                             "127.0.0.1:0", *args], stdout=stdout,
                            stderr=self.terminal.secondary)
        self.terminal.release()
        if "-q" not in args:
            found = self.terminal.wait_for(
                rb"Starting on 127\.0\.0\.1:(\d+)")
            self.address = ("127.0.0.1", int(found.group(1)))

    def connect(self) -> socket.socket:
        return socket.create_connection(self.address, timeout=TIMEOUT)

    def stop(self) -> int:
        self.proc.signal(signal.SIGTERM)
        return self.proc.finish()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.proc.close()
        self.terminal.close()


class StatusLineTest(unittest.TestCase):
    def test_a_reset_peer_is_closed_with_the_reason(self):
        with Listener("-f", "raw") as listener:
            sock = listener.connect()
            port = sock.getsockname()[1]
            sock.sendall(b"one\ntwo\n")
            listener.wait_stdout(2)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                            struct.pack("ii", 1, 0))
            sock.close()
            listener.wait_stderr(r"Closed 127\.0\.0\.1:%d( \(reset by peer\))?"
                                 r": 2 events\n" % port)

    def test_summary_uses_thousands_and_units(self):
        with Listener("-f", "raw", "-o", os.devnull) as listener:
            with listener.connect() as sock:
                sock.sendall((b"x" * 99 + b"\n") * 1204)
            listener.wait_stderr(r"Closed 127\.0\.0\.1:\d+: 1,204 events\n")
            self.assertEqual(listener.stop(), 0)
            self.assertIn("Stopped: 1,204 events, 117.6 KiB received, "
                          "1 connection, 0 rejected", listener.stderr_text)


class WildcardTest(unittest.TestCase):
    def test_wildcard_lists_this_hosts_addresses_that_work(self):
        with Listener("-f", "raw", listen="0.0.0.0:0") as listener:
            port = listener.address[1]
            found = listener.wait_stderr(
                r"Starting on 0\.0\.0\.0:%d \((this host: ([^)]*)|all "
                r"interfaces)\)\n" % port)
            if found.group(2) is None:
                self.skipTest("this host's addresses cannot be found here")
            listed = found.group(2).split(", ")
            for item in listed:
                self.assertRegex(item, r"^[\d.]+:%d$" % port)
            listener.wait_stderr(WAITING % re.escape(listed[0]))
            # Each address shown must reach this listener.
            for number, item in enumerate(listed, 1):
                host = item.rsplit(":", 1)[0]
                with socket.create_connection((host, port), timeout=TIMEOUT):
                    pass
                listener.wait_for(lambda: listener.stderr_text.count(
                    "Connection from") >= number, what="a connection")

    def test_wildcard_without_known_addresses_says_all_interfaces(self):
        console = Recorder()
        listener = lec.Listener(lec.Settings(listen=("0.0.0.0", 0)),
                                lec.Output(None), console)
        try:
            with mock.patch.object(lec, "interface_addresses", list), \
                    mock.patch.object(lec, "resolved_addresses", list):
                listener.bind()
            port = listener.address()[1]
        finally:
            listener.close()
        self.assertEqual(console.text.splitlines(), [
            "Starting on 0.0.0.0:%d (all interfaces)" % port,
            "Waiting for CyberTrace (OutputSettings > ConnectionString = "
            "this host's address:%d); Ctrl+C to stop" % port])

    def test_a_specific_address_lists_nothing_more(self):
        with Listener() as listener:
            listener.wait_stderr(WAITING % re.escape(
                "127.0.0.1:%d" % listener.address[1]))
            self.assertIn("Starting on 127.0.0.1:%d\n" % listener.address[1],
                          listener.stderr_text)


class Recorder(lec.Console):
    """A console that keeps what it would print."""

    def __init__(self) -> None:
        super().__init__()
        self.text = ""

    def write(self, text: str) -> None:
        self.text += text


class LiveLineTest(unittest.TestCase):
    def test_live_line_counts_and_is_cleared_before_other_lines(self):
        with TerminalListener("-f", "raw") as listener:
            term = listener.terminal
            term.wait_for(rb"\r0 events  0 bytes  0/s  0 connections open  ")
            with listener.connect() as sock:
                # A status line first clears the live line.
                term.wait_for(rb"\r +\r(Connection from [^\r]*)\r\n")
                sock.sendall(b"one\ntwo\nthree\n")
                term.wait_for(rb"\r3 events  14 bytes  \S+/s  1 connection "
                              rb"open  \S+ s")
                listener.proc.wait_stdout(3)
            term.wait_for(rb"\r +\rClosed 127\.0\.0\.1:\d+: 3 events\r\n")
            self.assertEqual(listener.stop(), 0)
            term.wait_for(rb"\nStopped: 3 events, 14 bytes received, "
                          rb"1 connection, 0 rejected\r\n")
            self.assertEqual(bytes(listener.proc.out), b"one\ntwo\nthree\n")
        # Every line on the screen starts clean: nothing but a clear (or
        # the start) before each status line.
        for line in bytes(term.data).split(b"\r\n")[:-1]:
            status = line.rsplit(b"\r", 1)[-1]
            self.assertRegex(status, rb"^(Starting|Waiting|Connection|Closed|"
                                     rb"Stopped)", line)

    def test_live_line_redraws_a_few_times_a_second_at_most(self):
        with TerminalListener("-f", "raw", "-o", os.devnull) as listener:
            term = listener.terminal
            start = time.monotonic()
            with listener.connect() as sock:
                # Keep the counters moving, so that each tick has news.
                deadline = start + 1.5
                while time.monotonic() < deadline:
                    sock.sendall(b"tick\n")
                    time.sleep(0.01)
            elapsed = time.monotonic() - start
            self.assertEqual(listener.stop(), 0)
        draws = len(re.findall(rb"\r[\d,]+ events? ", bytes(term.data)))
        self.assertGreaterEqual(draws, 1)
        self.assertLessEqual(draws, elapsed / lec.LIVE_SECONDS + 2)

    def test_events_on_the_same_terminal_start_on_a_clean_line(self):
        with TerminalListener("-f", "raw",
                              stdout_on_terminal=True) as listener:
            term = listener.terminal
            with listener.connect() as sock:
                term.wait_for(rb"\r[^\r]*1 connection open  ")
                sock.sendall(b"first event\n")
                term.wait_for(rb"first event")
                sock.sendall(b"second event\n")
                term.wait_for(rb"second event")
            self.assertEqual(listener.stop(), 0)
        screen = bytes(term.data)
        for event in (b"first event", b"second event"):
            before = screen[:screen.index(event)]
            self.assertRegex(before[-200:], rb"(\r +\r|\n)$")

    def test_a_live_line_is_cut_to_the_terminal_width(self):
        console = Recorder()
        console.live = True
        with mock.patch("os.get_terminal_size",
                        return_value=os.terminal_size((20, 5))):
            console.show("x" * 50)
        self.assertEqual(console.text, "\r" + "x" * 19)

    def test_a_shorter_live_line_blanks_the_rest_and_clear_blanks_all(self):
        console = Recorder()
        console.live = True
        console.show("10 events")
        console.show("9 events")
        console.show("9 events")  # no news: nothing written
        console.clear()
        console.clear()  # nothing shown: nothing written
        self.assertEqual(console.text, "\r10 events" "\r9 events \b"
                         "\r        \r")
        self.assertNotIn("\x1b", console.text)

    def test_no_live_line_with_quiet(self):
        with TerminalListener("-q", "--stats", "0.1") as listener:
            term = listener.terminal
            term.wait_for(rb"(Stats after [^\n]*\n.*){3}")
            self.assertEqual(listener.stop(), 0)
        self.assertNotRegex(bytes(term.data), rb"\r[\d,]+ events? ")
        self.assertNotIn(b"Starting", bytes(term.data))

    def test_no_live_line_on_a_pipe(self):
        with Listener("--stats", "0.1") as listener:
            listener.wait_for(lambda: listener.stderr_text.count("Stats") >= 3,
                              what="3 stats lines")
            self.assertEqual(listener.stop(), 0)
            self.assertNotIn("\x1b", listener.stderr_text)
            self.assertNotIn("\r", listener.stderr_text)


class StatsTest(unittest.TestCase):
    def test_stats_prints_the_counters_every_few_seconds(self):
        with Listener("-f", "raw", "--stats", "0.2") as listener, \
                listener.connect() as sock:
            sock.sendall(b"one\ntwo\nthree\n")
            listener.wait_stdout(3)
            listener.wait_for(lambda: len(re.findall(
                r"Stats after \S+ s: 3 events, 14 bytes received, [\d,]+/s "
                r"over the last \S+ s, 1 connection open\n",
                listener.stderr_text)) >= 2, what="two stats lines")

    @unittest.skipUnless(hasattr(signal, "SIGUSR1"), "no SIGUSR1")
    def test_sigusr1_prints_the_counters_at_once(self):
        with Listener("-f", "raw") as listener:
            listener.send(b"one\ntwo\n")
            listener.wait_stdout(2)
            listener.wait_stderr("Closed")
            listener.signal(signal.SIGUSR1)
            listener.wait_stderr(r"Stats after \S+ s: 2 events, 8 bytes "
                                 r"received, [\d,]+/s over the last \S+ s, 0 "
                                 r"connections open\n")
            # And it goes on serving.
            listener.send(b"three\n")
            listener.wait_stdout(3)
            self.assertEqual(listener.stop(), 0)

    def test_sighup_without_a_file_says_there_is_none(self):
        with Listener() as listener:
            listener.signal(signal.SIGHUP)
            listener.wait_stderr("SIGHUP: writing to stdout, no file to "
                                 "reopen\n")
            self.assertEqual(listener.stop(), 0)


class AllowFamilyTest(unittest.TestCase):
    """An --allow that no peer can ever match is a bad argument (it would
    refuse every peer for ever): one line, exit 2."""

    def run_listener(self, listen: str, *args: str):
        return subprocess.run([sys.executable, str(LISTENER), "-l", listen,
                               *args], capture_output=True, text=True,
                              timeout=TIMEOUT, env=user_env())

    def test_networks_of_the_other_family_are_an_argument_error(self):
        proc = self.run_listener("127.0.0.1:0", "--allow", "::1",
                                 "--allow", "127.0.0.0/8")
        self.assertEqual(proc.returncode, 2, proc.stderr)
        self.assertRegex(proc.stderr, r"^\S+: error: argument --allow: "
                         r"::1/128 can never match: this socket "
                         r"\(127\.0\.0\.1:\d+\) only takes IPv4 peers\n$")

    def test_a_network_holding_no_address_of_this_host_on_loopback(self):
        # Only a program on this host reaches a loopback socket, from one
        # of this host's addresses: a network holding none never matches.
        local = lec.interface_addresses()
        if not local:
            self.skipTest("this host's addresses are unknown here")
        network = next(net for net in map(ipaddress.ip_network, (
            "198.51.100.0/24", "203.0.113.0/24", "192.0.2.0/24"))
            if not any(ip in net for ip in local))
        proc = self.run_listener("127.0.0.1:0", "--allow", "127.0.0.1",
                                 "--allow", str(network))
        self.assertEqual(proc.returncode, 2, proc.stderr)
        self.assertRegex(proc.stderr, r"^\S+: error: argument --allow: "
                         r"%s can never match: this socket \(127\.0\.0\.1:"
                         r"\d+\) only takes peers on this host, and none of "
                         r"this host's addresses is in it\n$"
                         % re.escape(str(network)))

    def test_a_network_holding_an_address_of_this_host_is_a_warning(self):
        # A program here may connect to loopback from that address.
        mine = [ip for ip in lec.interface_addresses()
                if ip.version == 4 and not ip.is_loopback]
        if not mine:
            self.skipTest("no IPv4 address but loopback")
        network = ipaddress.ip_network("%s/32" % mine[0])
        with Listener("--allow", str(network)) as listener:
            listener.wait_stderr(WAITING % r"\S+")
            self.assertIn("warning: --allow %s matches only programs on this "
                          "host: this socket (127.0.0.1:%d) takes no peer "
                          "from another host\n" % (network,
                                                   listener.address[1]),
                          listener.stderr_text)
            self.assertEqual(listener.stop(), 0)

    def test_with_several_addresses_any_that_refuses_all_is_an_error(self):
        try:
            with socket.socket(socket.AF_INET6) as probe:
                probe.bind(("::1", 0))
        except OSError:
            self.skipTest("no IPv6 loopback")
        for args, words in (
                # The network matches at neither address.
                (["-l", "127.0.0.1:0", "-l", "[::1]:0", "--allow",
                  "2001:db8::/32"], r"2001:db8::/32 can never match: "),
                # 0.0.0.0 would take it, 127.0.0.1 would refuse everyone.
                (["-l", "0.0.0.0:0", "-l", "127.0.0.1:0", "--allow",
                  "::1"], r"::1/128 can never match: this socket "
                  r"\(0\.0\.0\.0:\d+\) only takes IPv4 peers\n")):
            with self.subTest(args=args):
                proc = subprocess.run(
                    [sys.executable, str(LISTENER), "-t", "0.5", *args],
                    capture_output=True, text=True, timeout=TIMEOUT,
                    env=user_env())
                self.assertEqual(proc.returncode, 2, proc.stderr)
                self.assertEqual(len(proc.stderr.splitlines()), 1,
                                 proc.stderr)
                self.assertRegex(proc.stderr, r"^\S+: error: argument "
                                 r"--allow: " + words)
        # Each address takes one of the networks: warnings only.
        with Listener("-l", "[::1]:0", "--allow", "127.0.0.1",
                      "--allow", "::1") as listener:
            listener.wait_stderr(r"Waiting for CyberTrace")
            self.assertIn("warning: --allow ::1/128 can never match: this "
                          "socket (127.0.0.1:%d) only takes IPv4 peers\n"
                          % listener.address[1], listener.stderr_text)
            self.assertEqual(listener.stop(), 0)

    @unittest.skipUnless(socket.has_ipv6, "no IPv6")
    def test_ipv6_sockets(self):
        try:
            with socket.socket(socket.AF_INET6) as probe:
                probe.bind(("::1", 0))
        except OSError:
            self.skipTest("no IPv6 loopback")
        proc = self.run_listener("[::1]:0", "--allow", "10.0.0.0/8")
        self.assertEqual(proc.returncode, 2, proc.stderr)
        self.assertRegex(proc.stderr, r"^\S+: error: argument --allow: "
                         r"10\.0\.0\.0/8 can never match: this socket "
                         r"\(\[::1\]:\d+\) only takes IPv6 peers\n$")
        # "::" takes IPv4 peers too (as ::ffff:a.b.c.d): no warning.
        with Listener("--allow", "10.0.0.0/8", "--allow", "::1",
                      listen="[::]:0") as listener:
            listener.wait_stderr(WAITING % r"\S+")
            self.assertNotIn("warning", listener.stderr_text)


class ArgumentWordsTest(unittest.TestCase):
    def run_listener(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(LISTENER), *args],
                              capture_output=True, text=True,
                              timeout=TIMEOUT, env=user_env())

    def test_numbers_that_do_not_parse_say_so_in_words(self):
        for args, words in ((("-n", "abc"), "-n/--count: abc: not a whole "
                             "number"),
                            (("-n", "1.5"), "1.5: not a whole number"),
                            (("--max-connections", "x"), "x: not a whole "
                             "number"),
                            (("-t", "soon"), "-t/--timeout: soon: not a "
                             "number"),
                            (("--idle-timeout", "nan"), "nan: not a finite "
                             "number"),
                            (("--stats", "inf"), "inf: not a finite number"),
                            (("--stats", "0"),
                             "0: must be from 0.01 to 10,000,000"),
                            (("--allow", "10.0.0.0/33"), "10.0.0.0/33: not a "
                             "network")):
            with self.subTest(args=args):
                proc = self.run_listener(*args)
                self.assertEqual(proc.returncode, 2, proc.stderr)
                last = proc.stderr.strip().splitlines()[-1]
                self.assertIn(words, last)
                self.assertNotIn("invalid literal", proc.stderr)
                self.assertNotIn("could not convert", proc.stderr)

    def test_file_modes_that_do_not_parse_say_so_in_words(self):
        for mode, words in (("rw-r-----", "not an octal mode"),
                            ("0648", "not an octal mode"),
                            ("", "not an octal mode"),
                            ("4755", "must be from 0000 to 0777")):
            with self.subTest(mode=mode):
                proc = self.run_listener("--file-mode", mode)
                self.assertEqual(proc.returncode, 2, proc.stderr)
                self.assertRegex(proc.stderr, r"^\S+: error: argument "
                                 r"--file-mode: .*%s" % words)

    def test_options_that_would_do_nothing_are_argument_errors(self):
        # As the sender's: a -o forgotten, a unix: address meant.
        for args, needed in ((("--file-mode", "0600"), "-o/--output FILE"),
                             (("--socket-mode", "0660"), "-l unix:/PATH"),
                             (("--remote-pipe-clients",),
                              "-l \\\\.\\pipe\\NAME"),
                             (("--per-host-prefix", "24/48"),
                              "--max-per-host N")):
            with self.subTest(args=args):
                proc = self.run_listener(*args, "-t", "5")
                self.assertEqual(proc.returncode, 2, proc.stderr)
                self.assertEqual(proc.stderr.splitlines(), [
                    "listen_events_cybertrace.py: error: argument %s: only "
                    "with %s" % (args[0], needed)])

    def test_empty_output_file_name_is_a_usage_error(self):
        proc = self.run_listener("-o", "", "-t", "5")
        self.assertEqual(proc.returncode, 2, proc.stderr)
        self.assertEqual(proc.stdout, "")
        self.assertRegex(proc.stderr.strip().splitlines()[-1],
                         r"error: argument -o/--output: empty file name$")


if __name__ == "__main__":
    unittest.main()
