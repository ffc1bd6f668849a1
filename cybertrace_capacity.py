"""The capacity test of send_events_cybertrace.py --load.

How many events a second CyberTrace answers, and how long a lookup takes at
that rate.  Every connection asks for reply-back with a LookupFinished per
event (X-KF-SendFinishedEventX-KF-ReplyBack), so the answered rate is what
CyberTrace processed and the time to an event's LookupFinished is its
lookup latency.

- Open loop, as wrk2: events are due at the offered rate whatever the
  answers do, and each latency runs from the time its event was due, not
  from when it went out, so a stalled CyberTrace cannot hide its delay
  (the coordinated-omission correction of wrk2 and HdrHistogram).
- Answers are matched to events in order per connection; where the
  FinishedEventFormat echoes the event (%REQ%), by its text.
- A ramp: the rate doubles from a low start until a step falls behind,
  then narrows between the last good and the first bad rate.
- One thread and one selector for every connection: the sender's own
  cost per event is what bounds the rate it can offer, and the report
  says when that, not CyberTrace, was the limit.
"""

from __future__ import annotations

import collections
import itertools
import json
import math
import selectors
import socket
import time
from typing import Callable, List, Optional

from listen_events_cybertrace import (Console, UserError, format_address,
                                      format_count, format_latency,
                                      open_connection, plural)

REPLY_BACK_FLAGS = b"X-KF-SendFinishedEventX-KF-ReplyBack"
FINISHED = b"LookupFinished"
# CyberTrace serves ScannersCount connections at once (9 by default), and
# one must stay free for PING: 8 leaves that one.
CONNECTIONS = 8
START_RATE = 100.0
STEP_SECONDS = 3.0
MAX_LATENCY = 1.0
# An answered rate under this share of the offered one is falling behind.
KEEP_UP = 0.95
# More than this share of a step's events unanswered at the in-flight cap.
UNANSWERED_SHARE = 0.01
# Events awaiting an answer on one connection: past it, new ones are not
# sent and count as unanswered, so memory stays bounded.
IN_FLIGHT = 100000
# Answers looked for ahead of the oldest event when the answer echoes
# another event's text.
ECHO_WINDOW = 1024
# Latency buckets per factor e: each a thousandth wider than the last.
BUCKETS_PER_E = 1000
# The narrowing ends when the good and the bad rate are this close.
NARROW_TO = 1.1
NARROW_STEPS = 4
# Above this share of a core the sender is its own limit.
BUSY = 0.9
LIVE_SECONDS = 0.25
RECV_SIZE = 256 * 1024
# Events per send() at most: a step's burst never builds a huge buffer.
BATCH = 4096


class Latencies:
    """Latencies kept as HdrHistogram keeps them: counts in buckets a
    thousandth wide (logarithmic, from a microsecond), so memory stays
    bounded however long a step runs (2,303 buckets a decade at most) and
    a percentile is within 0.05% of the exact one."""

    def __init__(self) -> None:
        self.buckets: collections.Counter = collections.Counter()
        self.count = 0
        self.largest: Optional[float] = None

    def record(self, seconds: float) -> None:
        micros = seconds * 1e6
        self.buckets[int(math.log(micros) * BUCKETS_PER_E)
                     if micros > 1 else -1] += 1
        self.count += 1
        if self.largest is None or seconds > self.largest:
            self.largest = seconds

    def percentile(self, share: float) -> Optional[float]:
        """Return the latency that share of the answers took at most."""
        if not self.count:
            return None
        if share >= 1:
            return self.largest
        rank = min(self.count - 1, int(share * self.count))
        seen = 0
        for bucket in sorted(self.buckets):
            seen += self.buckets[bucket]
            if seen > rank:
                # The bucket's middle: within half its width of any value.
                return 0.0 if bucket < 0 else math.exp(
                    (bucket + 0.5) / BUCKETS_PER_E) / 1e6
        return self.largest


class Step:
    """What one step of the ramp offered and got back."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.due = 0  # events due during the step
        self.sent = 0  # events handed to the kernel
        self.answered = 0
        self.in_time = 0  # answered by the step's end
        self.detections = 0
        self.capped = 0  # not sent: the connection's in-flight cap
        self.latencies = Latencies()
        self.seconds = 0.0
        self.cpu = 0.0
        # Awaiting an answer max_latency after they were due, when the
        # step ended; and never answered, once given up.
        self.late = 0
        self.given_up = 0
        self.verdict = ""

    @property
    def unanswered(self) -> int:
        return self.given_up + self.capped

    def percentile(self, share: float) -> Optional[float]:
        """Return the latency that share of the answers took at most."""
        return self.latencies.percentile(share)

    def answered_rate(self) -> float:
        return self.in_time / self.seconds if self.seconds else 0.0

    def offered_rate(self) -> float:
        return self.due / self.seconds if self.seconds else 0.0

    def sender_limited(self) -> bool:
        """Tell whether the sender, not CyberTrace, was the bottleneck."""
        # Bytes CyberTrace does not read wait in the sender, costing it
        # nothing: only a busy core says that the sender fell behind.
        return self.seconds > 0 and self.cpu / self.seconds > BUSY

    def as_dict(self) -> dict:
        return {"rate": self.rate, "answered_in_step": self.in_time,
                "seconds": round(self.seconds, 3),
                "offered": self.due, "sent": self.sent,
                "answered": self.answered, "detections": self.detections,
                "unanswered": self.unanswered, "capped": self.capped,
                "answered_rate": round(self.answered_rate(), 1),
                "p50": self.percentile(0.5), "p90": self.percentile(0.9),
                "p99": self.percentile(0.99), "max": self.percentile(1.0),
                "sender_cpu": round(self.cpu / self.seconds, 3)
                if self.seconds else None, "verdict": self.verdict}


class Lane:
    """One connection: its bytes waiting to go out and its events awaiting
    an answer, oldest first, as (due time, event index, step)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.out = bytearray(REPLY_BACK_FLAGS)
        self.waiting: collections.deque = collections.deque()
        self.pending = b""  # the start of an answer line
        self.echo: Optional[bool] = None  # answers carry the event's text
        self.closed = ""


def format_rate(rate: float) -> str:
    return format_count(int(round(rate)))


class CapacityTest:
    """Run the ramp against CyberTrace; collect a Step per rate tried."""

    clock = staticmethod(time.monotonic)

    def __init__(self, address: tuple, events: List[bytes],
                 connections: int = CONNECTIONS,
                 start_rate: float = START_RATE,
                 max_rate: Optional[float] = None,
                 step_seconds: float = STEP_SECONDS,
                 duration: Optional[float] = None,
                 max_latency: float = MAX_LATENCY,
                 in_flight: int = IN_FLIGHT, timeout: float = 5.0,
                 console: Optional[Console] = None) -> None:
        self.address = address
        self.where = format_address(*address)
        self.events = events
        self.lines = [event + b"\n" for event in events]
        self.connections = connections
        self.start_rate = start_rate
        self.max_rate = max_rate
        self.step_seconds = step_seconds
        self.duration = duration
        self.max_latency = max_latency
        self.in_flight = in_flight
        self.timeout = timeout
        self.console = console or Console(quiet=True)
        self.steps: List[Step] = []
        self.lanes: List[Lane] = []
        self.selector = selectors.DefaultSelector()
        self.next_event = 0
        self.stopped = ""  # why the ramp ended
        self.interrupted = False

    # --- connections -------------------------------------------------------

    def connect(self) -> None:
        for _ in range(self.connections):
            try:
                sock = open_connection(self.address, self.timeout)
            except OSError as exc:
                self.close()
                raise UserError("cannot connect to %s: %s" % (
                    self.where, exc.strerror or exc)) from None
            sock.setblocking(False)
            if sock.family != getattr(socket, "AF_UNIX", None):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            lane = Lane(sock)
            self.lanes.append(lane)
            self.selector.register(sock, selectors.EVENT_READ, lane)

    def close(self) -> None:
        for lane in self.lanes:
            lane.sock.close()
        self.selector.close()

    # --- one step ----------------------------------------------------------

    def run_step(self, step: Step, seconds: float) -> None:
        """Offer step.rate events a second for seconds."""
        started = self.clock()
        cpu = time.process_time()
        ends = started + seconds
        interval = 1.0 / step.rate
        lanes = self.lanes
        count = len(lanes)
        lines = self.lines
        cycle = len(lines)
        last_live = 0.0
        try:
            if len(self.steps) == 1:
                # Said once the first step exists: a Ctrl+C from now on
                # reports it.
                self.console.status(
                    "ramping up over %s to %s; Ctrl+C stops and reports"
                    % (plural(self.connections, "connection"), self.where))
            while True:
                now = self.clock()
                due = min(int((now - started) * step.rate) + 1,
                          int(seconds * step.rate))
                while step.due < due:
                    batch = min(due - step.due, BATCH)
                    for offset in range(batch):
                        number = step.due + offset
                        lane = lanes[number % count]
                        if len(lane.waiting) >= self.in_flight or \
                                lane.closed:
                            step.capped += 1
                            continue
                        index = self.next_event % cycle
                        self.next_event += 1
                        lane.waiting.append(
                            (started + number * interval, index, step))
                        lane.out += lines[index]
                        step.sent += 1
                    step.due += batch
                self.flush()
                if now >= ends:
                    break
                if now - last_live >= LIVE_SECONDS:
                    last_live = now
                    self.show_live(step, now - started)
                wake = min(ends, started + step.due * interval)
                self.wait(wake - self.clock())
                if all(lane.closed for lane in lanes):
                    self.stopped = "CyberTrace closed every connection (%s)" \
                        % lanes[0].closed
                    break
        except KeyboardInterrupt:
            self.interrupted = True
        finally:
            step.seconds = self.clock() - started
            step.in_time = step.answered
            step.cpu = time.process_time() - cpu
            stale = self.clock() - self.max_latency
            step.late = sum(1 for lane in lanes for entry in lane.waiting
                            if entry[2] is step and entry[0] < stale)

    def flush(self) -> None:
        """Hand what is waiting to the kernel, as much as it takes now."""
        for lane in self.lanes:
            if lane.out and not lane.closed:
                try:
                    sent = lane.sock.send(lane.out)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as exc:
                    self.lose(lane, exc.strerror or str(exc))
                    continue
                del lane.out[:sent]

    def wait(self, seconds: float) -> None:
        """Read answers until seconds pass (at least one look)."""
        writing = any(lane.out for lane in self.lanes)
        # With bytes left over, look again soon: the kernel takes them as
        # the peer reads.
        seconds = min(seconds, 0.001) if writing else seconds
        for key, _ in self.selector.select(max(seconds, 0)):
            self.read(key.data)

    def read(self, lane: Lane) -> None:
        try:
            data = lane.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.lose(lane, exc.strerror or str(exc))
            return
        if not data:
            self.lose(lane, "connection closed by CyberTrace")
            return
        now = self.clock()
        data = lane.pending + data
        end = data.rfind(b"\n") + 1
        lane.pending = data[end:]
        if data.count(FINISHED, 0, end) == 0:
            self.count_detections(lane, data.count(b"\n", 0, end))
            return
        for line in data[:end].split(b"\n")[:-1]:
            if FINISHED in line:
                self.answer(lane, line, now)
            else:
                self.count_detections(lane, 1)

    def count_detections(self, lane: Lane, number: int) -> None:
        # CyberTrace sends an event's detections before its LookupFinished.
        if lane.waiting and number:
            lane.waiting[0][2].detections += number

    def answer(self, lane: Lane, line: bytes, now: float) -> None:
        if not lane.waiting:
            return
        if lane.echo is None:
            lane.echo = self.events[lane.waiting[0][1]] in line
        if lane.echo and self.events[lane.waiting[0][1]] not in line:
            self.skip_unanswered(lane, line)
        due, _, step = lane.waiting.popleft()
        step.answered += 1
        step.latencies.record(now - due)

    def skip_unanswered(self, lane: Lane, line: bytes) -> None:
        """Give up the events ahead of the one that line echoes."""
        # One connection is one scanner, answering in order: events ahead
        # of the echoed one got no answer (dropped over EPSLimit), and
        # matching past them keeps their wait out of the others' latency.
        # Looked for within a window, so a stray line costs little.
        for ahead, entry in enumerate(itertools.islice(lane.waiting,
                                                       ECHO_WINDOW)):
            if self.events[entry[1]] in line:
                for _ in range(ahead):
                    lane.waiting.popleft()[2].given_up += 1
                return

    def lose(self, lane: Lane, why: str) -> None:
        if not lane.closed:
            lane.closed = why
            lane.out.clear()
            self.selector.unregister(lane.sock)

    def show_live(self, step: Step, elapsed: float) -> None:
        self.console.show("%s/s offered: %s sent, %s answered, %s awaiting, "
                          "%.0f s" % (
                              format_rate(step.rate), format_count(step.sent),
                              format_count(step.answered), format_count(
                                  sum(len(lane.waiting)
                                      for lane in self.lanes)), elapsed))

    # --- the ramp ----------------------------------------------------------

    def judge(self, step: Step) -> str:
        """Return why step fell behind, or "" if it kept up."""
        if step.due == 0:
            return ""
        p99 = step.percentile(0.99)
        if step.in_time < KEEP_UP * step.due:
            return "answered %s of %s" % (format_count(step.in_time),
                                          format_count(step.due))
        if p99 is not None and p99 > self.max_latency:
            return "p99 %s" % format_latency(p99)
        unanswered = step.late + step.capped
        if unanswered > UNANSWERED_SHARE * step.due:
            return "%s unanswered" % format_count(unanswered)
        return ""

    def run(self) -> None:
        """Climb until CyberTrace falls behind, the sender's own limit,
        --max-rate or --duration."""
        self.connect()
        started = self.clock()
        good, bad = None, None
        rate = self.start_rate
        narrowed = 0
        try:
            while True:
                if self.max_rate is not None:
                    rate = min(rate, self.max_rate)
                seconds = self.step_seconds
                if self.duration is not None:
                    seconds = min(seconds, started + self.duration -
                                  self.clock())
                    if seconds < 0.1:
                        self.stopped = self.stopped or "--duration reached"
                        break
                step = Step(rate)
                self.steps.append(step)
                self.run_step(step, seconds)
                self.console.clear()
                if self.interrupted or self.stopped:
                    step.verdict = "interrupted" if self.interrupted \
                        else "closed"
                    break
                why = self.judge(step)
                if why and step.sender_limited():
                    step.verdict = "sender limit"
                    self.stopped = "the sender's own limit"
                    break
                step.verdict = "behind: " + why if why else "kept up"
                if why:
                    bad = rate
                else:
                    good = rate
                if bad is None:
                    if self.max_rate is not None and rate >= self.max_rate:
                        self.stopped = "--max-rate reached"
                        break
                    rate *= 2
                    continue
                if good is None:
                    self.stopped = "fell behind at the first step"
                    break
                if bad / good <= NARROW_TO or narrowed >= NARROW_STEPS:
                    self.stopped = "fell behind"
                    break
                narrowed += 1
                rate = (good + bad) / 2
                self.wait_quiet()
            if not self.interrupted:
                self.wait_quiet()
        except KeyboardInterrupt:
            self.interrupted = True
        finally:
            for lane in self.lanes:
                for entry in lane.waiting:
                    entry[2].given_up += 1
                lane.waiting.clear()
            self.console.clear()
            self.close()

    def wait_quiet(self) -> None:
        """Let the backlog of a step that fell behind drain (at most
        max_latency) so that it does not weigh on the next."""
        deadline = self.clock() + self.max_latency
        while any(lane.waiting for lane in self.lanes) and \
                self.clock() < deadline:
            self.wait(deadline - self.clock())
        for lane in self.lanes:
            for entry in lane.waiting:
                entry[2].given_up += 1
            lane.waiting.clear()

    # --- the report ---------------------------------------------------------

    def best(self) -> Optional[Step]:
        kept = [step for step in self.steps if step.verdict == "kept up"]
        return max(kept, key=Step.answered_rate) if kept else None

    def format_row(self, step: Step) -> str:
        return "%10s %10s %10s %10s %10s %9s %9s %9s %9s %10s  %s" % (
            format_rate(step.rate), format_rate(step.answered_rate()),
            format_count(step.due),
            format_count(step.answered), format_count(step.detections),
            format_latency(step.percentile(0.5)),
            format_latency(step.percentile(0.9)),
            format_latency(step.percentile(0.99)),
            format_latency(step.percentile(1.0)),
            format_count(step.unanswered),
            step.verdict)

    def table(self) -> List[str]:
        rows = ["%10s %10s %10s %10s %10s %9s %9s %9s %9s %10s  %s" % (
            "offered/s", "answered/s", "offered", "answered", "detections",
            "p50", "p90",
            "p99", "max", "unanswered", "")]
        return rows + [self.format_row(step) for step in self.steps]

    def closing_line(self) -> str:
        best = self.best()
        over = plural(self.connections, "connection")
        if best is None:
            first = self.steps[0] if self.steps else None
            if first is None:
                return "CyberTrace at %s: nothing measured" % self.where
            if self.interrupted:
                return ("CyberTrace at %s: interrupted in the first step "
                        "(%s/s offered) after %.1f s, %s of %s answered "
                        "(p50 %s, p99 %s)" % (
                            self.where, format_rate(first.rate),
                            first.seconds, format_count(first.answered),
                            plural(first.due, "event"),
                            format_latency(first.percentile(0.5)),
                            format_latency(first.percentile(0.99))))
            if first.verdict == "sender limit":
                return ("CyberTrace at %s: not measured, the sender could "
                        "not offer %s events/s" % (self.where,
                                                   format_rate(first.rate)))
            return ("CyberTrace at %s answered %s of %s over %s in %.1f s "
                    "at %s offered: it fell behind at the lowest rate (%s)"
                    % (self.where, format_count(first.answered),
                       plural(first.due, "event"), over, first.seconds,
                       format_rate(first.rate), self.stopped or
                       first.verdict))
        text = "CyberTrace at %s answers %s events/s over %s (p50 %s, " \
            "p99 %s)" % (self.where, format_rate(best.answered_rate()), over,
                         format_latency(best.percentile(0.5)),
                         format_latency(best.percentile(0.99)))
        last = self.steps[-1]
        # The ramp may end on a step that kept up, narrowing down to the
        # limit: the lowest rate it fell behind at is the news.
        behind = [s for s in self.steps if s.verdict.startswith("behind")]
        if behind and not self.interrupted:
            worst = min(behind, key=lambda s: s.rate)
            text += "; at %s offered it fell behind (%s, p99 %s)" % (
                format_rate(worst.rate), worst.verdict[len("behind: "):],
                format_latency(worst.percentile(0.99)))
        elif last.verdict == "sender limit":
            text += "; at %s offered the sender itself was the limit (%d%% " \
                "of a core, %s of %s sent): CyberTrace may take more" % (
                    format_rate(last.rate), 100 * last.cpu / last.seconds,
                    format_count(last.sent), format_count(last.due))
        elif self.interrupted:
            text += "; interrupted at %s offered" % format_rate(last.rate)
        else:
            text += "; it kept up to the end (%s)" % self.stopped
        return text

    def as_dict(self) -> dict:
        best = self.best()
        return {"address": self.where, "connections": self.connections,
                "stopped": "interrupted" if self.interrupted
                else self.stopped,
                "sustained": round(best.answered_rate(), 1) if best else None,
                "steps": [step.as_dict() for step in self.steps],
                "summary": self.closing_line()}


def run_load(address: tuple, events: List[bytes], options: dict,
             console: Console, json_path: Optional[str] = None,
             out: Callable[[str], None] = print) -> int:
    """Run the capacity test; print the table and the closing line;
    return 0, 1 when no step kept up, 130 on Ctrl+C."""
    test = CapacityTest(address, events, console=console, **options)
    try:
        test.run()
    except KeyboardInterrupt:
        test.interrupted = True
    for row in test.table():
        out(row)
    out(test.closing_line())
    if json_path:
        try:
            with open(json_path, "w", encoding="utf-8") as file:
                json.dump(test.as_dict(), file, indent=1)
                file.write("\n")
        except OSError as exc:
            raise UserError("cannot write %s: %s" % (json_path,
                                                     exc.strerror))
    if test.interrupted:
        return 130
    return 0 if test.best() else 1
