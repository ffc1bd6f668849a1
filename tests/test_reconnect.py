"""The sender's --reconnect against listeners that stop, die and come back."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import unittest

from support import SENDER, TIMEOUT, Listener, Process, reset

import listen_events_cybertrace as lec

# Every event is 64 bytes and carries its number: order, gaps and
# duplicates can be read off the receiver's output.
EVENT = b"seq=%09d " + b"r" * 49 + b"\n"
OUTAGE = 1.0  # seconds a stopped listener stays down
# On a busy machine a listener may take a while to write out its backlog.
BACKLOG_TIMEOUT = TIMEOUT * 4


def events(start: int, stop: int) -> bytes:
    return b"".join(EVENT % number for number in range(start, stop))


def numbers(output: bytes) -> list:
    """Return the numbers of the whole events in a receiver's output."""
    whole = output[:output.rfind(b"\n") + 1]
    return [int(line[4:13]) for line in whole.splitlines()]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_all(fd: int, data: bytes, timeout: float = TIMEOUT) -> None:
    """Write data to a non-blocking pipe, failing after timeout."""
    view = memoryview(data)
    deadline = time.monotonic() + timeout
    while view:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError("the sender stopped reading its input")
        if select.select([], [fd], [], left)[1]:
            try:
                view = view[os.write(fd, view):]
            except BlockingIOError:
                pass


def rss_kib(pid: int) -> int:
    with open("/proc/%d/status" % pid) as status:
        return next(int(line.split()[1]) for line in status
                    if line.startswith("VmRSS:"))


def start_sender(port: int, *args: str, python: tuple = ()) -> Process:
    """Start the sender with --reconnect, reading a non-blocking pipe."""
    script = list(python) or [str(SENDER)]
    sender = Process([sys.executable, *script, "--reconnect", "-c",
                      "127.0.0.1:%d" % port, *args], stdin=subprocess.PIPE)
    os.set_blocking(sender.proc.stdin.fileno(), False)
    return sender


# The sender on a system whose kernel does not say what the peer
# acknowledged (no TIOCOUTQ, as on Windows).
WITHOUT_TIOCOUTQ = ("-c", "import runpy, sys; sys.modules['termios'] = None; "
                    "sys.argv[0] = %r; sys.path[0] = %r; "
                    "runpy.run_path(sys.argv[0], run_name='__main__')"
                    % (str(SENDER), str(SENDER.parent)))


def receive_buffer_bound() -> int:
    """Return the most a listener can lose when killed: what its kernel
    acknowledged and holds unread, plus what it read and did not write."""
    if lec.receive_buffer_granted():
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF,
                             lec.RECV_BUFFER)
            kernel = probe.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    else:
        with open("/proc/sys/net/ipv4/tcp_rmem") as limits:
            kernel = int(limits.read().split()[2])
    return kernel + lec.RECV_SIZE + lec.MAX_EVENT_BYTES


class Feeder:
    """Write numbered events into the sender's stdin at a steady pace."""

    def __init__(self, sender: Process, batch: int = 500,
                 pause: float = 0.01) -> None:
        self.fd = sender.proc.stdin.fileno()
        self.batch = batch
        self.pause = pause
        self.next = 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        data = b""
        while True:
            if not data:
                # Stop only between batches: a batch cut short would be
                # counted as sent, and its last events looked for in vain.
                if self.stopping.is_set():
                    return
                data = events(self.next, self.next + self.batch)
                self.next += self.batch
            # While the sender is disconnected the pipe stays full and we
            # wait here, as tail -F would.
            if select.select([], [self.fd], [], 0.05)[1]:
                try:
                    data = data[os.write(self.fd, data):]
                except BlockingIOError:
                    continue
                except OSError:
                    return
                if not data:
                    self.stopping.wait(self.pause)

    def finish(self) -> int:
        """Stop after the batch in hand; return how many events went in."""
        self.stopping.set()
        self.thread.join(TIMEOUT)
        if self.thread.is_alive():
            raise AssertionError("the sender stopped reading its input")
        return self.next


# Memory and buffer limits are read from /proc, and SIGSTOP/SIGKILL play
# the dying CyberTrace: Linux (CI) runs these.
@unittest.skipUnless(os.path.isdir("/proc/self"), "needs Linux's /proc")
class ReconnectTest(unittest.TestCase):
    def check_outputs(self, outputs: list, total: int, err: str,
                      gap_bytes: int = 0) -> None:
        """Each output is a run of numbers in order; together they hold
        every event but gaps of at most gap_bytes between outputs, and
        duplicates only of what the sender says it resent."""
        runs = [numbers(output) for output in outputs]
        for run in runs:
            self.assertEqual(run, list(range(run[0], run[0] + len(run)))
                             if run else [], "out of order or a gap")
        found = re.search(r"([\d,]+) events? resent", err)
        resent = int(found.group(1).replace(",", "")) if found else 0
        seen = set()
        for run in runs:
            seen.update(run)
        missing = set(range(total)) - seen
        if gap_bytes:
            self.assertLessEqual(len(missing) * len(EVENT),
                                 gap_bytes * len(runs), err)
        else:
            self.assertEqual(sorted(missing)[:10], [], err)
        self.assertEqual(seen - set(range(total)), set())
        duplicates = sum(map(len, runs)) - len(seen)
        self.assertLessEqual(duplicates, resent, err)

    def stream_through_outages(self, outages: int, stop, batch: int,
                               seen: int) -> tuple:
        """Stream numbered events with --reconnect into a listener that
        stop(listener) ends outages times, each time started again on the
        same port OUTAGE seconds later; return its outputs, how many events
        went in, the sender's stderr and the port."""
        listener = Listener("-f", "raw")
        port = listener.address[1]
        outputs = []
        try:
            with start_sender(port) as sender:
                feeder = Feeder(sender, batch=batch)
                for _ in range(outages):
                    listener.wait_stdout(seen)
                    stop(listener)
                    outputs.append(bytes(listener.out))
                    listener.close()
                    time.sleep(OUTAGE)
                    listener = Listener("-f", "raw", listen="127.0.0.1:%d"
                                        % port)
                listener.wait_stdout(seen)
                total = feeder.finish()
                sender.proc.stdin.close()
                self.assertEqual(sender.finish(), 0, sender.stderr_text)
                last = EVENT % (total - 1)
                listener.wait_for(lambda: last in listener.out,
                                  BACKLOG_TIMEOUT, "the last event")
                self.assertEqual(listener.stop(), 0)
                outputs.append(bytes(listener.out))
        finally:
            listener.close()
        err = sender.stderr_text
        self.assertNotIn("Traceback", err)
        return outputs, total, err, port

    def test_listener_stopped_and_restarted_loses_nothing(self):
        def stop(listener):
            self.assertEqual(listener.stop(signal.SIGTERM), 0)
        outputs, total, err, port = self.stream_through_outages(3, stop, 500,
                                                                3000)
        # One pair of lines per outage, warnings that -q would keep.
        # Closed by the peer, mostly; reset if a send raced its close.
        lost = re.findall(r"(?m)^warning: connection to 127\.0\.0\.1:%d "
                          r"lost \((closed by the peer|Connection reset by "
                          r"peer)\) after [\d,]+ events; retrying$" % port,
                          err)
        back = re.findall(r"(?m)^warning: reconnected after \d+\.\d s"
                          r"(; resending [\d,]+ events? not "
                          r"acknowledged)?$", err)
        self.assertEqual((len(lost), len(back)), (3, 3), err)
        self.assertRegex(err, r"Sent [\d,]+ events, .* 3 reconnects, "
                              r"[\d,]+ events? resent\n$")
        self.check_outputs(outputs, total, err)

    def test_listener_killed_loses_at_most_its_receive_buffer(self):
        # What the dead listener's kernel acknowledged but nobody read is
        # gone, and no sender can know which events those were: TCP's limit.
        def kill(listener):
            # Stopped first, it holds a full receive buffer when it dies,
            # and the sender unacknowledged events to resend.
            listener.signal(signal.SIGSTOP)
            time.sleep(0.3)
            listener.signal(signal.SIGKILL)
            listener.finish()
        outputs, total, err, _ = self.stream_through_outages(2, kill, 2000,
                                                             20000)
        # A reconnect that races the dying process's listening socket
        # lands in its backlog and is reset too: one more, and no loss.
        found = re.search(r"; (\d+) reconnects, [\d,]+ events? resent\n$",
                          err)
        self.assertIsNotNone(found, err)
        self.assertGreaterEqual(int(found.group(1)), 2, err)
        self.check_outputs(outputs, total, err,
                           gap_bytes=receive_buffer_bound())

    def test_a_peer_that_stops_reading_is_left_after_the_timeout(self):
        with Listener("-f", "json") as listener:
            with start_sender(listener.address[1], "-t", "1") as sender:
                feeder = Feeder(sender, batch=2000)
                listener.wait_stdout(10000)
                listener.signal(signal.SIGSTOP)
                try:
                    sender.wait_stderr(r"lost \(no progress for 1 s\) after "
                                       r"[\d,]+ events; retrying\n")
                finally:
                    listener.signal(signal.SIGCONT)
                sender.wait_stderr(r"reconnected after")
                total = feeder.finish()
                sender.proc.stdin.close()
                self.assertEqual(sender.finish(), 0, sender.stderr_text)
                last = b"seq=%09d " % (total - 1)
                listener.wait_for(lambda: last in listener.out,
                                  BACKLOG_TIMEOUT, "the last event")
                self.assertEqual(listener.stop(), 0)
        # The stalled connection still delivers what its kernel held; the
        # new one starts at the first event not acknowledged.
        by_peer = {}
        for line in bytes(listener.out).splitlines():
            record = json.loads(line)
            by_peer.setdefault(record["peer"], []).append(
                record["event"].encode() + b"\n")
        self.assertEqual(len(by_peer), 2)
        self.check_outputs([b"".join(events) for events in by_peer.values()],
                           total, sender.stderr_text)

    def test_rate_goes_on_after_an_outage_without_a_burst(self):
        listener = Listener("-f", "raw")
        port = listener.address[1]
        try:
            with start_sender(port, "--rate", "200") as sender:
                started = time.monotonic()
                write_all(sender.proc.stdin.fileno(), events(0, 300))
                sender.proc.stdin.close()
                listener.wait_stdout(60)
                self.assertEqual(listener.stop(), 0)
                first = bytes(listener.out)
                listener.close()
                listener = Listener("-f", "raw", listen="127.0.0.1:%d"
                                    % port)
                outage = float(sender.wait_stderr(
                    r"reconnected after (\d+\.\d) s").group(1))
                self.assertEqual(sender.finish(), 0, sender.stderr_text)
                took = time.monotonic() - started
                listener.wait_for(lambda: EVENT % 299 in listener.out,
                                  BACKLOG_TIMEOUT, "the last event")
                self.assertEqual(listener.stop(), 0)
                second = bytes(listener.out)
        finally:
            listener.close()
        self.check_outputs([first, second], 300, sender.stderr_text)
        # 300 events at 200/s take 1.5 s, and the outage comes on top:
        # catching up in a burst would end as soon as the outage does.
        self.assertGreater(outage, 0.2)
        self.assertGreaterEqual(took, 299 / 200 + outage - 0.1)

    def test_without_tiocoutq_a_send_buffer_is_resent(self):
        rounds, per_round = 4, 20000
        with ResettingPeer() as peer, start_sender(
                peer.address[1], "--retry-max", "0.05",
                python=WITHOUT_TIOCOUTQ) as sender:
            peer.take_rounds(sender, rounds, per_round)
            sender.proc.stdin.close()
            self.assertEqual(sender.finish(), 0, sender.stderr_text)
            peer.wait_for(lambda: peer.closed == rounds + 1, "the last close")
        err = sender.stderr_text
        self.check_outputs(peer.connections, rounds * per_round, err)
        resent = int(re.search(r"([\d,]+) events resent", err).group(1)
                     .replace(",", ""))
        # Every event arrived before each reset, so each one resent is a
        # duplicate; at most a send buffer's worth went again each time.
        duplicates = sum(len(numbers(data)) for data in peer.connections) - \
            rounds * per_round
        self.assertEqual(duplicates, resent)
        with open("/proc/sys/net/ipv4/tcp_wmem") as limits:
            largest = int(limits.read().split()[2])
        self.assertGreater(resent, 0)
        self.assertLessEqual(resent * len(EVENT), rounds * (
            2 * largest + 512 * 1024))

    def test_sender_started_before_the_listener(self):
        port = free_port()
        data = events(0, 200000)
        with start_sender(port) as sender:
            fd = sender.proc.stdin.fileno()
            # It connects once it has an event to send.
            written = os.write(fd, data[:64000])
            sender.wait_stderr(r"warning: cannot connect to 127\.0\.0\.1:%d "
                               r"\(Connection refused\); retrying" % port)
            # Not connected, it reads no further than one block: the pipe
            # fills and its writer waits.
            ends = time.monotonic() + 1.0
            while time.monotonic() < ends:
                try:
                    written += os.write(fd, data[written:])
                except BlockingIOError:
                    time.sleep(0.01)
            self.assertLess(written, 2 * 1024 * 1024)
            with Listener("-f", "raw", listen="127.0.0.1:%d" % port) \
                    as listener:
                write_all(fd, data[written:])
                sender.proc.stdin.close()
                self.assertEqual(sender.finish(), 0, sender.stderr_text)
                listener.wait_stdout(200000)
                self.assertEqual(listener.stop(), 0)
                self.assertEqual(numbers(bytes(listener.out)),
                                 list(range(200000)))
        self.assertRegex(sender.stderr_text,
                         r"(?m)^warning: connected after \d+\.\d s\n"
                         r"Sent 200,000 events, 12\.2 MiB to .* s\n$")

    def test_peer_resetting_every_few_thousand_events(self):
        rounds, per_round = 40, 20000
        warm = []

        def after(number):
            if number == 4:  # warmed up: RSS from here on stays flat
                warm.append(rss_kib(sender.proc.pid))
        # Each connection is short, so each retry backs off (a peer that
        # accepts and drops): capped here, or 40 would take minutes.
        with ResettingPeer() as peer, start_sender(
                peer.address[1], "--retry-max", "0.05") as sender:
            peer.take_rounds(sender, rounds, per_round, after)
            end = rss_kib(sender.proc.pid)
            sender.proc.stdin.close()
            self.assertEqual(sender.finish(), 0, sender.stderr_text)
            peer.wait_for(lambda: peer.closed == rounds + 1, "the last close")
        err = sender.stderr_text
        self.assertEqual(len(re.findall(r"lost \(Connection reset by peer\)",
                                        err)), rounds, err)
        self.assertRegex(err, r"; %d reconnects, " % rounds)
        self.check_outputs(peer.connections, rounds * per_round, err)
        # 51 MB went through, over 41 connections.
        self.assertLess(end - warm[0], 8 * 1024, "RSS grew from %d KiB to "
                        "%d KiB" % (warm[0], end))

    def test_ctrl_c_and_sigterm_during_an_outage(self):
        for number, status, word in ((signal.SIGINT, 130, "interrupted"),
                                     (signal.SIGTERM, 143, "terminated")):
            with self.subTest(signal=word), Listener("-f", "raw") as listener:
                with start_sender(listener.address[1], "-q") as sender:
                    fd = sender.proc.stdin.fileno()
                    write_all(fd, events(0, 1000))
                    listener.wait_stdout(1000)
                    self.assertEqual(listener.stop(), 0)
                    # The next event finds the connection closed.
                    write_all(fd, events(1000, 1001))
                    sender.wait_stderr(r"lost \(closed by the peer\) after "
                                       r"1,000 events; retrying\n")
                    sender.signal(number)
                    self.assertEqual(sender.finish(), status)
                err = sender.stderr_text
                self.assertNotIn("Traceback", err)
                # -q keeps the outage's warning and the counts.
                self.assertRegex(err, r"^warning: connection to .* lost "
                                      r"\(closed by the peer\) after 1,000 "
                                      r"events; retrying\n\S+: %s: 1,000 "
                                      r"events sent, 1,000 acknowledged\n$"
                                 % word)

    def test_refused_with_ping_reply_back_and_check(self):
        for mode in (["--ping"], ["--reply-back"], ["--check", "9998"]):
            with self.subTest(mode=mode):
                proc = subprocess.run([sys.executable, str(SENDER),
                                       "--reconnect", *mode, "-c", "1"],
                                      capture_output=True, timeout=TIMEOUT)
                self.assertEqual(proc.returncode, 2)
                self.assertRegex(proc.stderr.decode(),
                                 r"argument --reconnect: not allowed with %s"
                                 % mode[0])


class ResettingPeer:
    """A TCP server that records each connection and resets on request."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.address = self.server.getsockname()[:2]
        self.connections = []
        self.resets = 0  # asked for
        self.closed = 0
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while True:
            try:
                sock, _ = self.server.accept()
            except OSError:
                return
            data = bytearray()
            with self.cond:
                self.connections.append(data)
                wanted = self.resets + 1
            sock.settimeout(0.02)
            with sock:
                while True:
                    with self.cond:
                        if self.resets >= wanted:
                            reset(sock)
                            break
                    try:
                        chunk = sock.recv(1 << 16)
                    except socket.timeout:
                        continue
                    except OSError:
                        break
                    if not chunk:
                        break
                    with self.cond:
                        data += chunk
                        self.cond.notify_all()
            with self.cond:
                self.closed += 1
                self.cond.notify_all()

    def received(self, data: bytes) -> bool:
        """Say whether the latest connection, if one came yet, has data."""
        return bool(self.connections) and data in self.connections[-1]

    def take_rounds(self, sender: Process, rounds: int, per_round: int,
                    each=lambda number: None) -> None:
        """Feed the sender per_round numbered events a round; once each
        round has arrived, call each(round) and reset the connection."""
        fd = sender.proc.stdin.fileno()
        for number in range(rounds):
            write_all(fd, events(number * per_round,
                                 (number + 1) * per_round))
            last = EVENT % ((number + 1) * per_round - 1)
            self.wait_for(lambda: self.received(last), "round %d" % number)
            each(number)
            # Reset while the sender waits for input: then nothing its
            # peer's kernel acknowledged goes unread.
            self.reset(number + 1)

    def reset(self, count: int) -> None:
        """Reset the current connection, the count-th reset so far."""
        with self.cond:
            self.resets = count
        self.wait_for(lambda: self.closed >= count, "reset %d" % count)

    def wait_for(self, predicate, what: str) -> None:
        with self.cond:
            if not self.cond.wait_for(predicate, TIMEOUT):
                raise AssertionError("timed out waiting for " + what)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.server.shutdown(socket.SHUT_RDWR)  # wakes accept()
        except OSError:
            pass
        self.server.close()
        self.thread.join(TIMEOUT)


if __name__ == "__main__":
    unittest.main()
