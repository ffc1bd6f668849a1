"""--follow and --state: files followed as tail -F does, across rotation,
and a position saved only for what the peer acknowledged."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import unittest.mock

from support import (SENDER, TIMEOUT, Listener, Process, RecordingStandIn,
                     address, wait_until)

import follow_files
import send_events_cybertrace as sender_module

try:
    import fcntl
    import pty
    import termios
except ImportError:
    pty = None


def line(stream: str, number: int) -> bytes:
    """Return a numbered line of a stream, 64 bytes with its newline."""
    return b"%s seq=%09d " % (stream.encode(), number) + b"x" * 47 + b"\n"


def lines(stream: str, start: int, stop: int) -> bytes:
    return b"".join(line(stream, number) for number in range(start, stop))


def numbers(output: bytes, stream: str) -> list:
    """Return the numbers of a stream's whole lines, in the order received."""
    whole = output[:output.rfind(b"\n") + 1]
    prefix = stream.encode() + b" seq="
    return [int(each[len(prefix):len(prefix) + 9])
            for each in whole.splitlines() if each.startswith(prefix)]


def append(path: str, data: bytes) -> None:
    with open(path, "ab") as file:
        file.write(data)


class Collector:
    """A Follower of real files, read round by round without a peer."""

    def __init__(self, paths: list, state: str | None = None,
                 from_start: bool = False,
                 rotated_quiet: float = follow_files.ROTATED_QUIET_SECONDS
                 ) -> None:
        self.warnings = []
        self.statuses = []
        self.follower = follow_files.Follower(
            paths, str,
            lambda: sender_module.EventFramer(
                sender_module.CYBERTRACE_EVENT_BYTES),
            sender_module.drop_blank_lines, self.warnings.append,
            self.statuses.append, state, from_start, poll=0,
            rotated_quiet=rotated_quiet)

    def take(self) -> bytes:
        """Return all the whole lines there are now, as the sender gets
        them: read until a few rounds in a row bring nothing."""
        got = []
        quiet = 0
        while quiet < 4:
            blocks = [bytes(block) for block, count in self.follower.round()
                      if count]
            got += blocks
            quiet = 0 if blocks else quiet + 1
        return b"".join(got)

    def acknowledge(self, events: int | None = None) -> None:
        """Say that the peer acknowledged events (all so far if None)."""
        self.follower.settle(self.follower.numbered if events is None
                             else events)

    def close(self, acked: int | None = None) -> None:
        self.follower.close(acked)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.follower.close()


class FollowedFileCase(unittest.TestCase):
    """A test with a folder of its own: app.log, and state.json for it."""

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir)
        self.log = os.path.join(self.dir, "app.log")
        self.state = os.path.join(self.dir, "state.json")


class FollowFilesTest(FollowedFileCase):
    """Rotation, truncation and positions, with real files."""

    def saved(self) -> dict:
        with open(self.state) as file:
            return json.load(file)["files"][self.log]

    def test_without_state_it_starts_at_the_end(self):
        append(self.log, lines("a", 0, 10))
        with Collector([self.log]) as follow:
            self.assertEqual(follow.take(), b"")
            append(self.log, lines("a", 10, 12))
            self.assertEqual(follow.take(), lines("a", 10, 12))
        with Collector([self.log], from_start=True) as follow:
            self.assertEqual(follow.take(), lines("a", 0, 12))

    def test_a_partial_last_line_waits_for_its_newline(self):
        with Collector([self.log]) as follow:
            append(self.log, b"one\ntw")
            self.assertEqual(follow.take(), b"one\n")
            append(self.log, b"o\r\n")
            self.assertEqual(follow.take(), b"two\n")

    def test_rename_rotation_finishes_the_old_file_first(self):
        append(self.log, lines("a", 0, 5))
        with Collector([self.log], from_start=True) as follow:
            self.assertEqual(follow.take(), lines("a", 0, 5))
            append(self.log, lines("a", 5, 8))
            os.rename(self.log, self.log + ".1")
            # Still written by a writer that has not reopened yet, and a
            # last line without its newline.
            append(self.log + ".1", lines("a", 8, 10) + b"last")
            append(self.log, lines("a", 10, 13))
            self.assertEqual(follow.take(), lines("a", 5, 10) + b"last\n" +
                             lines("a", 10, 13))
            self.assertTrue(any("rotated" in each
                                for each in follow.statuses))

    def test_lines_written_before_the_writer_reopens_are_not_lost(self):
        # logrotate's `create`: rename, a new empty file, and only then
        # (postrotate) the writer reopens; meanwhile it writes the old one.
        append(self.log, lines("a", 0, 5))
        with Collector([self.log], from_start=True) as follow:
            self.assertEqual(follow.take(), lines("a", 0, 5))
            os.rename(self.log, self.log + ".1")
            append(self.log, b"")
            self.assertEqual(follow.take(), b"")
            append(self.log + ".1", lines("a", 5, 8))
            self.assertEqual(follow.take(), lines("a", 5, 8))
            # Reopened: once the new file has a line, the old one is done.
            append(self.log + ".1", lines("a", 8, 9))
            append(self.log, lines("a", 9, 11))
            self.assertEqual(follow.take(), lines("a", 8, 11))
            append(self.log + ".1", b"too late\n")
            append(self.log, lines("a", 11, 12))
            self.assertEqual(follow.take(), lines("a", 11, 12))

    def test_a_renamed_file_quiet_for_long_is_finished(self):
        append(self.log, lines("a", 0, 2))
        with Collector([self.log], from_start=True,
                       rotated_quiet=0.2) as follow:
            follow.take()
            append(self.log, b"cut")
            os.rename(self.log, self.log + ".1")
            append(self.log, b"")
            self.assertEqual(follow.take(), b"")
            # Its last line, without a newline, goes once it is quiet.
            wait_until(lambda: follow.take() == b"cut\n", what="the last "
                       "line of the renamed file")

    def test_copytruncate_sends_the_rest_from_the_copy_then_from_0(self):
        append(self.log, lines("a", 0, 20))
        with Collector([self.log], from_start=True) as follow:
            self.assertEqual(follow.take(), lines("a", 0, 20))
            # Written, not read yet, when logrotate copies and truncates.
            append(self.log, lines("a", 20, 25))
            shutil.copyfile(self.log, self.log + ".1")
            os.truncate(self.log, 0)
            append(self.log, lines("a", 25, 27))
            self.assertEqual(follow.take(), lines("a", 20, 27))

    def test_copytruncate_without_a_copy_warns_and_reads_from_0(self):
        append(self.log, lines("a", 0, 20))
        with Collector([self.log], from_start=True) as follow:
            follow.take()
            os.truncate(self.log, 0)
            append(self.log, lines("a", 20, 22))
            self.assertEqual(follow.take(), lines("a", 20, 22))
        self.assertEqual(len(follow.warnings), 1, follow.warnings)
        self.assertRegex(follow.warnings[0], r"was truncated and no copy")

    def test_a_file_that_appears_later_or_comes_back(self):
        with Collector([self.log]) as follow:
            self.assertEqual(follow.take(), b"")
            append(self.log, lines("a", 0, 3))
            self.assertEqual(follow.take(), lines("a", 0, 3))
            append(self.log, lines("a", 3, 4) + b"cut")
            os.unlink(self.log)
            self.assertEqual(follow.take(), lines("a", 3, 4) + b"cut\n")
            append(self.log, lines("a", 4, 6))
            self.assertEqual(follow.take(), lines("a", 4, 6))

    def test_a_file_that_cannot_be_read_yet_is_not_called_missing(self):
        os.symlink(self.log, self.log)  # a loop: open() fails, not ENOENT
        with Collector([self.log]) as follow:
            self.assertEqual(follow.take(), b"")
            self.assertRegex(follow.warnings[0], r"cannot read .*app\.log: "
                             r"Too many levels of symbolic links; trying")
            self.assertRegex(follow.statuses[0], r"app\.log: it cannot be "
                             r"read; read from its start once it can$")
            os.unlink(self.log)
            append(self.log, lines("a", 0, 2))
            self.assertEqual(follow.take(), lines("a", 0, 2))
        self.assertEqual(len(follow.warnings), 1, follow.warnings)

    def test_several_files_each_with_its_own_position(self):
        other = os.path.join(self.dir, "other.log")
        append(self.log, lines("a", 0, 3))
        append(other, lines("b", 0, 4))
        with Collector([self.log, other], self.state, True) as follow:
            got = follow.take()
            self.assertEqual(numbers(got, "a"), [0, 1, 2])
            self.assertEqual(numbers(got, "b"), [0, 1, 2, 3])
            follow.acknowledge()
        with open(self.state) as file:
            files = json.load(file)["files"]
        self.assertEqual(files[self.log]["offset"], 3 * 64)
        self.assertEqual(files[other]["offset"], 4 * 64)

    def test_the_position_saved_is_the_first_event_not_acknowledged(self):
        append(self.log, b"")
        with Collector([self.log], self.state) as follow:
            for start in range(0, 30, 10):  # three blocks of 10
                append(self.log, lines("a", start, start + 10))
                follow.take()
            follow.acknowledge(25)  # inside the third block
            follow.close()
        self.assertEqual(self.saved()["offset"], 25 * 64)
        append(self.log, lines("a", 30, 32))
        with Collector([self.log], self.state) as follow:
            self.assertEqual(follow.take(), lines("a", 25, 32))
        self.assertTrue(any("from byte 1600" in each
                            for each in follow.statuses), follow.statuses)

    def test_an_appended_file_keeps_its_identity(self):
        # Shorter than the head at first: the head grows with it.
        append(self.log, b"short\n")
        with Collector([self.log], self.state, True) as follow:
            follow.take()
            follow.acknowledge()
        self.assertEqual(self.saved()["head_bytes"], 6)
        append(self.log, lines("a", 0, 40))
        with Collector([self.log], self.state) as follow:
            self.assertEqual(follow.take(), lines("a", 0, 40))
            follow.acknowledge()
        self.assertEqual(self.saved()["head_bytes"], 1024)
        self.assertEqual(follow.warnings, [])

    def test_renamed_while_stopped_the_old_file_is_found_by_inode(self):
        append(self.log, lines("a", 0, 5))
        with Collector([self.log], self.state, True) as follow:
            follow.take()
            follow.acknowledge()
        append(self.log, lines("a", 5, 7))
        os.rename(self.log, self.log + ".1")
        append(self.log, lines("a", 7, 9))
        with Collector([self.log], self.state) as follow:
            self.assertEqual(follow.take(), lines("a", 5, 9))
        self.assertEqual(follow.warnings, [])

    def test_copytruncated_while_stopped_the_copy_is_found_by_head(self):
        append(self.log, lines("a", 0, 10))
        with Collector([self.log], self.state, True) as follow:
            follow.take()
            follow.acknowledge()
        append(self.log, lines("a", 10, 12))
        shutil.copyfile(self.log, self.log + ".1")
        os.truncate(self.log, 0)
        append(self.log, lines("a", 12, 13))
        with Collector([self.log], self.state) as follow:
            self.assertEqual(follow.take(), lines("a", 10, 13))
        self.assertEqual(follow.warnings, [])

    def test_a_small_file_copytruncated_is_found_by_its_whole_head(self):
        # 18 bytes: under the head that tells files apart, but the only
        # file beside it that starts so.
        small = b"".join(b"%d\n" % number for number in range(10, 20))
        append(self.log, small[:18])
        with Collector([self.log], self.state, True) as follow:
            follow.take()
            follow.acknowledge()
        append(self.log, small[18:])
        shutil.copyfile(self.log, self.log + ".1")
        os.truncate(self.log, 0)
        append(self.log, b"20\n")
        with Collector([self.log], self.state) as follow:
            self.assertEqual(follow.take(), small[18:] + b"20\n")
            # And while it runs.
            append(self.log, b"21\n")
            shutil.copyfile(self.log, self.log + ".2")
            os.truncate(self.log, 0)
            append(self.log, b"22\n")
            self.assertEqual(follow.take(), b"21\n22\n")
        self.assertEqual(follow.warnings, [])

    def test_two_small_copies_alike_are_not_guessed_between(self):
        append(self.log, b"head\n")
        with Collector([self.log], self.state, True) as follow:
            follow.take()
            follow.acknowledge()
        append(self.log, b"one\n")
        for suffix in (".1", ".2"):
            shutil.copyfile(self.log, self.log + suffix)
        os.truncate(self.log, 0)
        append(self.log, b"two\n")
        with Collector([self.log], self.state) as follow:
            self.assertEqual(follow.take(), b"two\n")
        self.assertEqual(len(follow.warnings), 1, follow.warnings)

    def test_a_damaged_state_warns_and_starts_at_the_end(self):
        append(self.log, lines("a", 0, 5))
        for damage in (b"{\"version\": 1, \"fil", b"\xff\xfe",
                       b"[]", b'{"version": 1, "files": {"%s": {"offset":'
                       b' -4}}}' % self.log.encode()):
            for from_start in (False, True):
                with self.subTest(damage=damage, from_start=from_start):
                    with open(self.state, "wb") as file:
                        file.write(damage)
                    with Collector([self.log], self.state,
                                   from_start) as follow:
                        got = follow.take()
                    self.assertEqual(got, lines("a", 0, 5) if from_start
                                     else b"")
                    self.assertEqual(len(follow.warnings), 1)
                    self.assertRegex(follow.warnings[0], r"--state .* is "
                                     r"damaged \(.*; kept as .*state\.json"
                                     r"\.damaged\): starting each file at"
                                     r" its %s" % ("start" if from_start
                                                   else "end"))
                    # Written again whole: the next start is clean; what
                    # it held is kept beside it.
                    self.assertEqual(self.saved()["offset"],
                                     0 if from_start else 5 * 64)
                    with open(self.state + ".damaged", "rb") as file:
                        self.assertEqual(file.read(), damage)

    def test_a_file_replaced_while_stopped_is_read_from_its_start(self):
        append(self.log, lines("a", 0, 5))
        with Collector([self.log], self.state, True) as follow:
            follow.take()
            follow.acknowledge()
        # Rotated, the old file compressed (gone), and a new one written,
        # as long or longer, while the sender was down.
        os.unlink(self.log)
        append(self.log, lines("z", 0, 9))
        with Collector([self.log], self.state) as follow:
            self.assertEqual(follow.take(), lines("z", 0, 9))
            follow.acknowledge()
        self.assertEqual(len(follow.warnings), 1, follow.warnings)
        self.assertRegex(follow.warnings[0], r"app\.log was replaced since "
                         r"its position was saved, .*: reading the new one "
                         r"from its start; what the old one had after byte "
                         r"320 is not sent")
        self.assertEqual(self.saved()["offset"], 9 * 64)

    def test_a_state_of_another_file_warns_and_starts_at_the_end(self):
        append(self.log, lines("a", 0, 5))
        with Collector([self.log], self.state, True) as follow:
            follow.take()
            follow.acknowledge()
        # Brought from another host: its device is not this file's.
        with open(self.state) as file:
            record = json.load(file)
        record["files"][self.log]["device"] += 1
        with open(self.state, "w") as file:
            json.dump(record, file)
        with Collector([self.log], self.state) as follow:
            self.assertEqual(follow.take(), b"")
            append(self.log, lines("a", 5, 6))
            self.assertEqual(follow.take(), lines("a", 5, 6))
        self.assertEqual(len(follow.warnings), 1, follow.warnings)
        self.assertRegex(follow.warnings[0], r"holds the position of another "
                         r"file than .*app\.log \(its device differs: .*\): "
                         r"starting at its end")

    def test_the_state_is_replaced_atomically(self):
        append(self.log, lines("a", 0, 5))
        with Collector([self.log], self.state, True) as follow:
            follow.take()
            follow.acknowledge()
            before = os.stat(self.state).st_ino
            follow.close()
        # A new file renamed over the old, and no temporary file left.
        self.assertNotEqual(os.stat(self.state).st_ino, before)
        self.assertEqual(sorted(os.listdir(self.dir)),
                         ["app.log", "state.json", "state.json.lock"])
        self.assertEqual(self.saved()["offset"], 5 * 64)

    def test_the_state_is_saved_at_most_once_a_second_synced_first(self):
        calls = []
        real = os.fsync, os.replace

        def fsync(fd):
            calls.append("fsync")
            return real[0](fd)

        def replace(source, target):
            calls.append("rename")
            return real[1](source, target)
        append(self.log, b"")
        with unittest.mock.patch.object(os, "fsync", fsync), \
                unittest.mock.patch.object(os, "replace", replace):
            with Collector([self.log], self.state) as follow:
                started = time.monotonic()
                number = 0
                # Acknowledged at every round, for 2.5 s.
                while time.monotonic() - started < 2.5:
                    append(self.log, line("a", number))
                    number += 1
                    follow.take()
                    follow.acknowledge()
                    time.sleep(0.01)
                saves = calls.count("rename")
            # The first at the start, then one a second, and one on exit.
        self.assertIn(saves, (3, 4), calls)
        self.assertEqual(calls.count("rename"), saves + 1)
        # Each written to disk (file, then folder) around its rename.
        self.assertEqual(calls, ["fsync", "rename", "fsync"] * (saves + 1))
        self.assertEqual(self.saved()["offset"], number * 64)

    @unittest.skipIf(follow_files.fcntl is None, "no flock here")
    def test_a_state_in_use_by_another_sender_is_an_error(self):
        append(self.log, lines("a", 0, 1))
        with Collector([self.log], self.state):
            with self.assertRaisesRegex(follow_files.StateError, r"^--state "
                                        r".*state\.json is in use by another"
                                        r" sender: give each its own"):
                Collector([self.log], self.state)
        # Free again once the first one is done.
        Collector([self.log], self.state).close()

    def test_a_state_that_cannot_be_written_fails_at_once(self):
        missing = os.path.join(self.dir, "no", "state.json")
        with self.assertRaisesRegex(follow_files.StateError,
                                    r"cannot write .*: No such file"):
            Collector([self.log], missing)


def start_sender(port: int, *args: str) -> Process:
    return Process([sys.executable, str(SENDER), "-c", "127.0.0.1:%d" % port,
                    *args])


class FollowCommandTest(FollowedFileCase):
    """The sender's --follow and --state, as a user runs them."""

    def test_sigterm_saves_what_was_acknowledged_and_a_restart_resumes(self):
        append(self.log, lines("a", 0, 100))
        with Listener("-f", "raw") as listener:
            port = listener.address[1]
            with start_sender(port, "--follow", self.log, "--state",
                              self.state) as sender:
                sender.wait_stderr(r"Following .*app\.log from its end")
                append(self.log, lines("a", 100, 110))
                listener.wait_stdout(10)
                sender.signal(signal.SIGTERM)
                self.assertEqual(sender.finish(), 143)
            self.assertRegex(sender.stderr_text, r"terminated: 10 events "
                             r"sent, 10 acknowledged\n$")
            append(self.log, lines("a", 110, 120))
            with start_sender(port, "--follow", self.log, "--state",
                              self.state) as sender:
                sender.wait_stderr(r"from byte 7040 \(saved in ")
                listener.wait_stdout(20)
                sender.signal(signal.SIGTERM)
                self.assertEqual(sender.finish(), 143)
            self.assertEqual(listener.stop(), 0)
        self.assertEqual(numbers(bytes(listener.out), "a"),
                         list(range(100, 120)))

    @unittest.skipIf(pty is None, "needs FIONREAD")
    def test_only_what_the_peer_acknowledged_is_saved(self):
        # A peer that never reads, with a small receive buffer: most of
        # what is sent stays unacknowledged in the sender's kernel.
        with socket.socket() as server:
            server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            server.bind(("127.0.0.1", 0))
            server.listen()
            append(self.log, b"")
            with start_sender(server.getsockname()[1], "--follow",
                              self.log, "--state", self.state, "-t",
                              "60") as sender:
                sender.wait_stderr(r"Following .*app\.log from its end")
                append(self.log, lines("a", 0, 20000))
                server.settimeout(TIMEOUT)
                peer, _ = server.accept()
                with peer:
                    # The peer's kernel took some, and holds it unread.
                    wait_until(lambda: int.from_bytes(fcntl.ioctl(
                        peer.fileno(), termios.FIONREAD, b"\0" * 4),
                        sys.byteorder) >= 2048, TIMEOUT, "data at the peer")
                    sender.signal(signal.SIGTERM)
                    self.assertEqual(sender.finish(), 143)
        found = re.search(r"terminated: ([\d,]+) events sent, ([\d,]+) "
                          r"acknowledged", sender.stderr_text)
        sent, acked = (int(each.replace(",", "")) for each in found.groups())
        with open(self.state) as file:
            offset = json.load(file)["files"][self.log]["offset"]
        self.assertLess(acked, sent)
        self.assertLess(offset, 20000 * 64)
        # Exactly the start of the first event not acknowledged.
        self.assertEqual(offset, acked * 64, sender.stderr_text)

    def saved_offset(self):
        try:
            with open(self.state) as file:
                return json.load(file)["files"][self.log]["offset"]
        except (OSError, ValueError, KeyError):
            return None

    def test_a_long_line_in_a_followed_file_is_warned_of_at_once(self):
        # A followed file never ends: a warning kept for its end never
        # came, and its long lines went out cut, unsaid.
        append(self.log, b"")
        with Listener("-f", "raw") as listener:
            with start_sender(listener.address[1], "--follow",
                              self.log) as sender:
                sender.wait_stderr(r"Following .*app\.log from its end")
                append(self.log, b"z" * 200000 + b"\n")
                listener.wait_stdout(4)
                sender.wait_stderr(r"warning: .*app\.log: a line longer "
                                   r"than 64 KiB sent in pieces of 64 KiB")
                append(self.log, b"y" * 200000 + b"\n")
                listener.wait_stdout(8)
                sender.signal(signal.SIGTERM)
                self.assertEqual(sender.finish(), 143)
            self.assertEqual(listener.stop(), 0)
        self.assertEqual(sender.stderr_text.count("warning"), 1,
                         sender.stderr_text)

    def test_a_damaged_state_is_a_warning_on_the_command_line(self):
        append(self.log, lines("a", 0, 5))
        with open(self.state, "w") as file:
            file.write("{\"version\": 1, \"files\": ")
        with Listener("-f", "raw") as listener:
            with start_sender(listener.address[1], "-q", "--follow",
                              self.log, "--state", self.state,
                              "--from-start") as sender:
                listener.wait_stdout(5)
                sender.signal(signal.SIGTERM)
                self.assertEqual(sender.finish(), 143)
            self.assertEqual(listener.stop(), 0)
        self.assertRegex(sender.stderr_text, r"^warning: --state .* is "
                         r"damaged \(.*\): starting each file at its start "
                         r"\(--from-start\)\n")
        self.assertNotIn("Traceback", sender.stderr_text)

    def test_what_it_refuses(self):
        append(self.log, b"a line of the log\n")
        link = os.path.join(self.dir, "link")
        os.symlink(self.log, link)
        cases = [(("--state", self.state), r"--state: only with --follow"),
                 (("--from-start",), r"--from-start: only with --follow"),
                 (("--follow", self.log, "-e", "x"),
                  r"--follow: not allowed with -e/--event"),
                 (("--follow", self.log, "--repeat", "2"),
                  r"--follow: not allowed with --repeat"),
                 (("--follow", self.log, self.log),
                  r"--follow: a file given twice"),
                 (("--retry-max", "1"), r"--retry-max: only with "
                  r"--reconnect"),
                 (("--follow", self.log, "--state", self.log),
                  r"--state: .*app\.log is a file --follow reads"),
                 (("--follow", self.log, "--state", link),
                  r"--state: .*link is a file --follow reads"),
                 (("--follow", self.log, self.dir),
                  r"--follow: .* is a directory; it follows regular files")]
        for args, pattern in cases:
            with self.subTest(args=args):
                proc = subprocess.run([sys.executable, str(SENDER), "-c",
                                       "1", *args], capture_output=True,
                                      timeout=TIMEOUT)
                self.assertEqual(proc.returncode, 2, proc.stderr)
                self.assertRegex(proc.stderr.decode(), pattern)
        # The state written over the log would have replaced it.
        with open(self.log, "rb") as file:
            self.assertEqual(file.read(), b"a line of the log\n")

    def test_a_state_folder_that_cannot_be_written_is_an_error(self):
        proc = subprocess.run([sys.executable, str(SENDER), "-c", "1", "-q",
                               "--follow", self.log, "--state",
                               os.path.join(self.dir, "no", "s.json")],
                              capture_output=True, timeout=TIMEOUT)
        self.assertEqual(proc.returncode, 1)
        self.assertRegex(proc.stderr.decode(), r"^send_events_cybertrace\.py"
                         r": error: cannot write .*s\.json: No such file or "
                         r"directory\n$")


class ReplyBackStateTest(FollowedFileCase):
    """With --reply-back, a position passes an event only once CyberTrace
    answered it (LookupFinished), however much its TCP acknowledged."""

    def setUp(self) -> None:
        super().setUp()
        append(self.log, b"")

    def follow(self, stand_in, answered: bool, start: int) -> Process:
        """Append 3 lines, following with --reply-back; stop once all the
        lines not passed yet are in."""
        with Process([sys.executable, str(SENDER), "-c", address(stand_in),
                      "--follow", self.log, "--state", self.state,
                      "--reply-back"]) as sender:
            sender.wait_stderr(r"Following .*app\.log from")
            append(self.log, lines("a", start, start + 3))
            wait_until(lambda: stand_in.received().count(b"\n") >=
                       start + 3, what="the lines at the stand-in")
            if answered:
                sender.wait_stdout(start + 3)
            sender.signal(signal.SIGTERM)
            self.assertEqual(sender.finish(), 143)
        return sender

    def offset(self) -> int:
        with open(self.state) as file:
            return json.load(file)["files"][self.log]["offset"]

    def test_unanswered_events_are_not_passed_then_answered_ones_are(self):
        with RecordingStandIn(answer=False) as stand_in:
            sender = self.follow(stand_in, False, 0)
        # (TCP's acknowledgement of the last may still be on its way.)
        self.assertRegex(sender.stderr_text, r"terminated: 3 events sent, "
                         r"[23] acknowledged; 0 events answered")
        self.assertEqual(self.offset(), 0)
        # The next run sends them again, to a CyberTrace that answers.
        with RecordingStandIn() as stand_in:
            sender = self.follow(stand_in, True, 3)
            self.assertEqual(numbers(stand_in.received(), "a"),
                             list(range(6)))
        self.assertRegex(sender.stderr_text, r"from byte 0 \(saved in")
        self.assertEqual(sender.out.count(b"LookupFinished"), 6)
        self.assertEqual(self.offset(), 6 * 64)

    def test_cybertrace_closing_the_connection_ends_it(self):
        with RecordingStandIn() as stand_in:
            with Process([sys.executable, str(SENDER), "-c",
                          address(stand_in), "--follow", self.log, "--state",
                          self.state, "--reply-back"]) as sender:
                sender.wait_stderr(r"Following .*app\.log from")
                append(self.log, lines("a", 0, 2))
                sender.wait_stdout(2)
                stand_in.close()
                self.assertEqual(sender.finish(), 1, sender.stderr_text)
        self.assertRegex(sender.stderr_text, r"error: connection to .* lost"
                         r": closed by CyberTrace \(2 events sent, 2 "
                         r"acknowledged by the peer\)\n$")
        self.assertEqual(self.offset(), 2 * 64)


class LostPeerTest(FollowedFileCase):
    """A peer that goes while the followed file is quiet is noticed then,
    not at the next line, which might be hours away."""

    def setUp(self) -> None:
        super().setUp()
        append(self.log, b"")

    def test_without_reconnect_it_exits_1_with_the_state_saved(self):
        with Listener("-f", "raw") as listener:
            with start_sender(listener.address[1], "--follow", self.log,
                              "--state", self.state) as sender:
                sender.wait_stderr(r"Following .*app\.log from its end")
                append(self.log, lines("a", 0, 2))
                listener.wait_stdout(2)
                self.assertEqual(listener.stop(), 0)
                # No line comes after: systemd's Restart=on-failure must
                # still see the failure.
                self.assertEqual(sender.finish(), 1, sender.stderr_text)
        self.assertRegex(sender.stderr_text, r"error: connection to "
                         r"127\.0\.0\.1:\d+ lost: closed by the peer \(2 "
                         r"events sent, 2 acknowledged by the peer\)\n$")
        with open(self.state) as file:
            self.assertEqual(json.load(file)["files"][self.log]["offset"],
                             2 * 64)

    def test_with_reconnect_it_reconnects_and_its_last_line_counts_it(self):
        listener = Listener("-f", "raw")
        port = listener.address[1]
        try:
            with start_sender(port, "--follow", self.log, "--state",
                              self.state, "--reconnect", "--retry-max",
                              "0.5") as sender:
                sender.wait_stderr(r"Following .*app\.log from its end")
                append(self.log, lines("a", 0, 2))
                listener.wait_stdout(2)
                self.assertEqual(listener.stop(), 0)
                sender.wait_stderr(r"lost \(closed by the peer\) after 2 "
                                   r"events; retrying")
                listener.close()
                listener = Listener("-f", "raw", listen="127.0.0.1:%d"
                                    % port)
                sender.wait_stderr(r"reconnected after")
                append(self.log, lines("a", 2, 3))
                listener.wait_stdout(1)
                sender.signal(signal.SIGTERM)
                self.assertEqual(sender.finish(), 143)
            self.assertEqual(listener.stop(), 0)
        finally:
            listener.close()
        self.assertEqual(numbers(bytes(listener.out), "a"), [2])
        # The last event may be in the listener's output before its TCP
        # acknowledgement is back (a delayed ACK): 2 or 3 acknowledged.
        self.assertRegex(sender.stderr_text, r"terminated: 3 events sent, "
                         r"[23] acknowledged; 1 reconnect, 0 events "
                         r"resent\n$")

    def test_with_reconnect_a_peer_not_there_is_said_at_the_start(self):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        with start_sender(port, "--follow", self.log, "--reconnect",
                          "--retry-max", "0.5") as sender:
            # Before any line: a wrong -c shows when the service starts.
            sender.wait_stderr(r"warning: cannot connect to 127\.0\.0\.1:%d "
                               r"\(Connection refused\); retrying" % port)
            with Listener("-f", "raw", listen="127.0.0.1:%d" % port) \
                    as listener:
                sender.wait_stderr(r"connected after")
                append(self.log, lines("a", 0, 1))
                listener.wait_stdout(1)
                sender.signal(signal.SIGTERM)
                self.assertEqual(sender.finish(), 143)
                self.assertEqual(listener.stop(), 0)


class RejectingPeerTest(unittest.TestCase):
    def test_a_peer_that_accepts_and_drops_is_backed_off_and_warned(self):
        # The real listener, refusing the sender's address after the
        # handshake, as in the issue.
        with Listener("-f", "raw", "--allow", "127.0.0.2/32") as listener:
            with Process([sys.executable, str(SENDER), "--reconnect",
                          "--retry-max", "2", "-c", "127.0.0.1:%d"
                          % listener.address[1]],
                         stdin=subprocess.PIPE) as sender:
                # Events trickle in, as from tail -F: each next one finds
                # the connection dropped.
                stop = threading.Event()

                def trickle():
                    number = 0
                    while not stop.wait(0.1):
                        try:
                            sender.proc.stdin.write(b"event %d\n" % number)
                            sender.proc.stdin.flush()
                        except OSError:
                            return
                        number += 1
                thread = threading.Thread(target=trickle, daemon=True)
                thread.start()
                try:
                    found = sender.wait_stderr(
                        r"(?s)(reconnected after .*){5}", TIMEOUT * 2)
                finally:
                    stop.set()
                    thread.join(TIMEOUT)
                sender.signal(signal.SIGTERM)
                self.assertEqual(sender.finish(), 143)
            self.assertEqual(listener.stop(), 0)
        err = sender.stderr_text
        self.assertIsNotNone(found)
        waits = [float(each) for each in
                 re.findall(r"reconnected after (\d+\.\d) s", err)]
        # No tight loop: 0.5 s (less jitter) then doubling, up to 2 s.
        self.assertGreaterEqual(waits[0], 0.3, err)
        for before, after in zip(waits, waits[1:4]):
            self.assertGreaterEqual(after, min(before * 1.4, 1.4), err)
        self.assertEqual(len(re.findall(r"accepted and then dropped", err)),
                         1, err)
        self.assertRegex(err, r"warning: 127\.0\.0\.1:\d+ accepted and then "
                         r"dropped 3 connections in a row, each within 3 s: "
                         r"what its TCP acknowledged may not have been "
                         r"processed .*--reply-back")
        self.assertEqual(listener.out, b"")


@unittest.skipIf(pty is None, "no pseudo-terminals here")
class ProgressDuringAnOutageTest(unittest.TestCase):
    def test_the_line_counts_what_went_out_not_what_was_read(self):
        from test_sender_console import Console
        append(self.dir_log(), b"")
        listener = Listener("-f", "raw")
        port = listener.address[1]
        try:
            with Console("--follow", self.log, "--reconnect", "-c",
                         "127.0.0.1:%d" % port) as console:
                console.wait_screen(rb"0 events  0 bytes  0/s  0 "
                                    rb"acknowledged")
                append(self.log, lines("a", 0, 3))
                listener.wait_stdout(3)
                console.wait_screen(rb"\r3 events  192 bytes  [\d,]+/s  3 "
                                    rb"acknowledged")
                self.assertEqual(listener.stop(), 0)
                # The next line finds the connection closed: none is sent.
                append(self.log, lines("a", 3, 5))
                console.wait_screen(rb"lost \(closed by the peer\)")
                mark = len(console.screen)
                # Read, held, not sent: the line still says 3 and 192.
                wait_until(lambda: re.search(
                    rb"\r3 events  192 bytes  [\d,]+/s  3 acknowledged",
                    bytes(console.screen[mark:])), TIMEOUT, "a redraw")
                self.assertNotRegex(bytes(console.screen[mark:]),
                                    rb"\r[45] events|320 bytes|256 bytes")
                console.type(b"\x03")
                self.assertEqual(console.finish(), 130)
        finally:
            listener.close()
        self.assertRegex(bytes(console.screen),
                         rb"interrupted: 3 events sent, 3 acknowledged")

    def dir_log(self) -> str:
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir)
        self.log = os.path.join(self.dir, "app.log")
        return self.log


class Writer:
    """Append numbered lines to two logs at a steady rate, rotating them
    when told (between two lines, as a logger and logrotate would)."""

    def __init__(self, paths: dict, per_second: float) -> None:
        self.paths = paths  # stream: path
        self.pause = 1 / per_second
        self.next = {stream: 0 for stream in paths}
        self.written = []  # (monotonic time, count so far) samples
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.rotated = 0
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stopping.is_set():
            with self.lock:
                for stream, path in self.paths.items():
                    append(path, line(stream, self.next[stream]))
                    self.next[stream] += 1
                self.written.append((time.monotonic(),
                                     sum(self.next.values())))
            self.stopping.wait(self.pause)

    def rename(self, stream: str) -> None:
        with self.lock:
            self.rotated += 1
            path = self.paths[stream]
            os.rename(path, "%s.%d" % (path, self.rotated))

    def copytruncate(self, stream: str) -> None:
        with self.lock:
            self.rotated += 1
            path = self.paths[stream]
            shutil.copyfile(path, "%s.%d" % (path, self.rotated))
            os.truncate(path, 0)

    def written_between(self, start: float, end: float) -> int:
        """Return how many lines were written from start to end."""
        before = [count for when, count in self.written if when < start]
        upto = [count for when, count in self.written if when <= end]
        return (upto[-1] if upto else 0) - (before[-1] if before else 0)

    def stop(self) -> dict:
        self.stopping.set()
        self.thread.join(TIMEOUT)
        return dict(self.next)


class DoneWhenTest(unittest.TestCase):
    """The issue's test: 30 s of logging, through sender kills, rotations
    and a listener restart."""

    def test_every_line_arrives_through_kills_rotations_and_restarts(self):
        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder)
        paths = {"a": os.path.join(folder, "a.log"),
                 "b": os.path.join(folder, "b.log")}
        state = os.path.join(folder, "state.json")
        for path in paths.values():
            append(path, b"")
        listener = Listener("-f", "raw")
        port = listener.address[1]
        outputs = []
        senders = []
        kills = []

        def start():
            sender = start_sender(port, "--follow", *paths.values(),
                                  "--state", state, "--reconnect",
                                  "--retry-max", "0.5")
            senders.append(sender)
            sender.wait_stderr(r"Following .*b\.log")
            return sender

        def kill(sender):
            kills.append(time.monotonic())
            sender.proc.kill()
            sender.finish()

        writer = None
        try:
            sender = start()
            writer = Writer(paths, 100)  # 200 lines a second in all
            began = time.monotonic()

            def at(second):
                left = began + second - time.monotonic()
                if left > 0:
                    time.sleep(left)
            at(4)
            kill(sender)
            at(5)
            sender = start()
            at(8)
            writer.rename("a")  # while the sender runs
            at(11)
            kill(sender)
            writer.copytruncate("b")  # while the sender is down
            at(12.5)
            sender = start()
            at(15)
            writer.copytruncate("a")  # while the sender runs
            at(19)
            stopped = time.monotonic()
            self.assertEqual(listener.stop(signal.SIGTERM), 0)
            outputs.append(bytes(listener.out))
            listener.close()
            at(20)
            listener = Listener("-f", "raw", listen="127.0.0.1:%d" % port)
            at(23)
            writer.rename("b")  # while the sender runs, again
            at(30)
            total = writer.stop()
            last = [line(stream, count - 1)
                    for stream, count in total.items()]
            listener.wait_for(lambda: all(each in listener.out
                                          for each in last),
                              TIMEOUT * 2, "the last lines")
            sender.signal(signal.SIGTERM)
            self.assertEqual(sender.finish(), 143, sender.stderr_text)
            self.assertEqual(listener.stop(), 0)
            outputs.append(bytes(listener.out))
        finally:
            if writer is not None:
                writer.stop()
            listener.close()
            for each in senders:
                each.close()
        errors = "".join(each.stderr_text for each in senders)
        self.assertNotIn("Traceback", errors)
        self.assertEqual([each.proc.returncode for each in senders],
                         [-9, -9, 143], errors)
        duplicates = 0
        for stream, count in total.items():
            received = [number for output in outputs
                        for number in numbers(output, stream)]
            # Every line at least once, and each first seen in order.
            first_seen = list(dict.fromkeys(received))
            self.assertEqual(first_seen, list(range(count)),
                             "%s: lines missing or out of order" % stream)
            duplicates += len(received) - count
        # What a kill sends again: what was in flight or acknowledged
        # since the last save (a second); the listener's SIGTERM costs
        # what it had not acknowledged.  Bounded by what was written in
        # the 2 s before each.
        window = sum(writer.written_between(when - 2, when)
                     for when in kills + [stopped])
        self.assertLessEqual(duplicates, window, errors)
        self.assertGreater(sum(total.values()), 5000)
        # Each rotation was noticed and followed, none warned of: the
        # warnings are the outages'.
        self.assertEqual([each for each in errors.splitlines()
                          if each.startswith("warning:") and not re.match(
                              r"warning: (connection to .* lost|reconnected"
                              r" after|cannot connect|connected after)",
                              each)], [], errors)
        self.assertRegex(errors, r"a\.log was rotated")
        self.assertRegex(errors, r"b\.log was rotated")
        self.assertRegex(errors, r"a\.log was truncated \(copytruncate\): "
                         r"reading the rest from a\.log\.\d, then")
        self.assertRegex(errors, r"Following .*b\.log from byte \d+ of "
                         r"b\.log\.\d, where it was copied")
        self.measured = (sum(total.values()), duplicates, window)


if __name__ == "__main__":
    unittest.main()
