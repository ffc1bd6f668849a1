"""Fuzzing with fixed seeds, so that a failure can be replayed.

Random byte streams go through the real listener over concurrent
connections, cut at random places; its output must be exactly the
reference framing of the input, in every format.  Random lines built from
CyberTrace's documented templates (key=value, "|"-separated, CEF, with a
syslog <PRI>) check the parser, directly and through the listener's JSON
output, where compiled plans serve most lines and the general path the
rest: both must give what the parser gives.
"""

from __future__ import annotations

import json
import random
import re
import unittest
from collections import defaultdict

from support import Listener, reference_framing

import listen_events_cybertrace as lec

SEEDS = (1, 2, 3)
MAX_EVENT = 64

PIECES = [b"\n", b"\r", b"\r\n", b"\n\n", b"\x00", b"\xff", b"\xe2\x82",
          b"\xd0\x96", b"\xe2\x82\xac", b" ", b"|", b"=", b'"', b"\\",
          b"\t", b"\x1b[2J", b"key=value ", b"a=1 b=2", b"x" * 70,
          b"y" * 200, b"Received:", b"- category=KL_IP ip=192.0.2.1",
          b"<13>", b"CEF:0|V\\|x|P|1|2|N|5|", b" msg=a\\=b\\\\c\\n",
          b"LookupFinished", b"alert=KL_ALERT_X", b"matchedIndicator=1"]


def random_stream(rng: random.Random) -> bytes:
    """Return a stream of random pieces: any byte, odd and huge lines."""
    stream = b"".join(rng.choice(PIECES) for _ in range(rng.randrange(80)))
    if rng.random() < 0.5:
        stream += b"\n"
    return stream


def send_concurrently(listener: Listener, streams: list,
                      rng: random.Random) -> list:
    """Send each stream on its own connection, interleaved in random
    chunks; return each connection's local port."""
    sockets = [listener.connect() for _ in streams]
    try:
        ports = [s.getsockname()[1] for s in sockets]
        pending = [[sock, data] for sock, data in zip(sockets, streams)]
        while pending:
            item = rng.choice(pending)
            step = rng.randrange(1, 40)
            item[0].sendall(item[1][:step])
            item[1] = item[1][step:]
            if not item[1]:
                pending.remove(item)
    finally:
        for sock in sockets:
            sock.close()
    return ports


def text(event: bytes) -> str:
    return event.decode("utf-8", "backslashreplace")


def reference_pieces(data: bytes, size: int) -> list:
    """Return, for each event of reference_framing(data, size), None or
    (piece number, last) for the pieces of an event longer than size."""
    marks = []
    for event in reference_framing(data, size * 1000000):
        count = max(1, -(-len(event) // size))
        marks.extend([None] if count == 1 else
                     [(n, n == count) for n in range(1, count + 1)])
    return marks


class StreamFuzzTest(unittest.TestCase):
    def run_format(self, fmt: str, seed: int) -> None:
        rng = random.Random(seed)
        streams = [random_stream(rng) for _ in range(rng.randrange(1, 9))]
        expected = [reference_framing(s, MAX_EVENT) for s in streams]
        self.pieces = [reference_pieces(s, MAX_EVENT) for s in streams]
        total = sum(map(len, expected))
        with Listener("-f", fmt, "--max-event-bytes", str(MAX_EVENT)) \
                as listener:
            ports = send_concurrently(listener, streams, rng)
            lines = total * (2 if fmt == "text" else 1)
            listener.wait_stdout(lines)
            # Alive and still serving after all that.
            listener.send(b"still=alive\n")
            listener.wait_stdout(lines + (2 if fmt == "text" else 1))
            self.assertEqual(listener.stop(), 0)
            out = bytes(listener.out).split(b"\n")[:-1]
        getattr(self, "check_" + fmt)(out[:lines], expected, ports)

    def check_raw(self, out: list, expected: list, ports: list) -> None:
        self.assertEqual(sorted(out), sorted(e for events in expected
                                             for e in events))

    def check_text(self, out: list, expected: list, ports: list) -> None:
        self.assertEqual(set(out[0::2]), {b"Received:"} if out else set())
        self.assertEqual(sorted(out[1::2]), sorted(
            text(e).encode() for events in expected for e in events))

    def check_json(self, out: list, expected: list, ports: list) -> None:
        by_peer = defaultdict(list)
        for line in out:
            record = json.loads(line)
            by_peer[record["peer"]].append(record)
        for port, events, pieces in zip(ports, expected, self.pieces):
            records = by_peer.pop("127.0.0.1:%d" % port, [])
            # Every byte comes back: those that are not UTF-8 as \udcNN.
            self.assertEqual([r["event"].encode("utf-8", "surrogateescape")
                              for r in records], events)
            self.assertEqual([(r["piece"], r["last"]) if "piece" in r
                              else None for r in records], pieces)
            kind = None
            for record in records:
                piece = record.get("piece", 1)
                if piece == 1:
                    # The first piece reads as an event; the rest carry
                    # its kind and no fields.
                    kind, fields = lec.read_event(record["event"])
                else:
                    fields = {}
                self.assertEqual(record["fields"], fields, record)
                self.assertEqual(record["kind"], kind, record)
        self.assertEqual(dict(by_peer), {})

    def test_raw(self):
        for seed in SEEDS:
            with self.subTest(seed=seed):
                self.run_format("raw", seed)

    def test_text(self):
        for seed in SEEDS:
            with self.subTest(seed=seed):
                self.run_format("text", seed)

    def test_json(self):
        for seed in SEEDS:
            with self.subTest(seed=seed):
                self.run_format("json", seed)


KEYS = ["category", "matchedIndicator", "url", "src", "ip", "md5", "sha1",
        "sha256", "usrName", "confidence", "MD5", "first_seen", "last_seen",
        "popularity", "threat", "ip_geo", "feed", "records", "alert",
        "reason", "msg", "eventName", "sent_events", "total", "cn1", "Geo",
        "MatchedIndicator", "cs5Label", "cs5"]
VALUES = ["-", "", "KL_Malicious_Hash_MD5", "776735A8CA96DB15B422879DA599F474",
          "192.0.2.1", "10.07.2015 23:53", "HEUR:Trojan.Win32.Generic",
          "KL_Malicious_URL:1;", "http://fakess123.nu/?a=b&c=d",
          "feed=Malicious_URL_Data_Feed.json", "Example Device",
          "ru,br,ua,cz,us", "LookupFinished", "100", "x  y", "юникод",
          'with "quotes"', "back\\slash", "a=b=c", "trailing ", "a  b   ",
          " ", "KL_ALERT_UpdatedFeed", "MatchedIndicator"]
# CEF's values escape "=", "\" and line ends; in the header, "|" and "\".
CEF_VALUES = {"a\\=b": "a=b", "c:\\\\dir": "c:\\dir", "one\\ntwo": "one\ntwo",
              "cr\\r": "cr\r", "x|y": "x|y", "-": "-", "Example Device":
              "Example Device"}
CEF_PREFIXES = {
    "CEF:0|Kaspersky Lab|Kaspersky CyberTrace for ArcSight|2.0|1|CyberTrace "
    "Service Event|4|": ("alert", ["0", "Kaspersky Lab", "Kaspersky "
                                   "CyberTrace for ArcSight", "2.0", "1",
                                   "CyberTrace Service Event", "4"]),
    "<134>CEF:0|Kaspersky|Cyber\\|Trace|2.0|2|CyberTrace Detection Event|8|":
        ("detection", ["0", "Kaspersky", "Cyber|Trace", "2.0", "2",
                       "CyberTrace Detection Event", "8"]),
    "Sep 19 08:26:10 host CEF:1|V\\\\|P|3|7|Other|1|":
        ("unknown", ["1", "V\\", "P", "3", "7", "Other", "1"]),
}
PREFIXES = ["-", "Apr 16 09:05:41", "", "<232>%CyberTrace:ALERT_EVENT",
            "<13>", *CEF_PREFIXES]
CEF_NAMES = ["cefVersion", "deviceVendor", "deviceProduct", "deviceVersion",
             "deviceEventClassId", "name", "severity"]
ALERT = re.compile(r"(?<![\w.])alert=KL_ALERT_")


def random_template(rng: random.Random) -> tuple:
    """Return (keys, separator, prefix) for a template CyberTrace could use
    (a CEF extension's pairs are separated by spaces only)."""
    keys = [rng.choice(KEYS) for _ in range(rng.randrange(0, 12))]
    prefix = rng.choice(PREFIXES)
    return keys, " " if prefix in CEF_PREFIXES else rng.choice(" |"), prefix


def render(template: tuple, rng: random.Random) -> tuple:
    """Return an event of the template with random values, its fields and
    its kind."""
    keys, separator, prefix = template
    cef = CEF_PREFIXES.get(prefix)
    if cef:
        pairs = [(key, rng.choice(list(CEF_VALUES))) for key in keys]
    else:
        pairs = [(key, rng.choice(VALUES)) for key in keys]
    body = separator.join("%s=%s" % pair for pair in pairs)
    # <13> sticks to the first key, as it comes from syslog.
    glue = "" if prefix == "<13>" else " "
    line = (prefix + glue + body) if prefix and pairs else (prefix or body)
    grouped = defaultdict(list)
    if prefix.startswith("<"):
        grouped["pri"].append(prefix[1:prefix.index(">")])
    if cef:
        for name, value in zip(CEF_NAMES, cef[1]):
            grouped[name].append(value)
    for key, value in pairs:
        # A value ends before the white space that follows it.
        grouped[key].append(CEF_VALUES[value] if cef else value.rstrip(" "))
    fields = {key: values[0] if len(values) == 1 else values
              for key, values in grouped.items()}
    if "LookupFinished" in line:
        kind = "finished"
    elif ALERT.search(line):
        kind = "alert"
    elif cef and cef[0] != "unknown":
        kind = cef[0]
    elif "matchedIndicator" in fields or "MatchedIndicator" in fields:
        kind = "detection"
    else:
        kind = "unknown"
    return line, fields, kind


class FieldFuzzTest(unittest.TestCase):
    def lines(self, seed: int, count: int) -> list:
        rng = random.Random(seed)
        templates = [random_template(rng) for _ in range(20)]
        return [render(rng.choice(templates), rng) for _ in range(count)]

    def test_parser_returns_every_key_and_value(self):
        kinds = set()
        for seed in SEEDS:
            for line, fields, kind in self.lines(seed, 2000):
                self.assertEqual(lec.read_event(line), (kind, fields), line)
                kinds.add(kind)
        self.assertEqual(kinds, set(lec.KINDS))

    def test_listener_json_matches_the_parser(self):
        lines = self.lines(99, 3000)
        with Listener("-f", "json") as listener:
            with listener.connect() as sock:
                # In many batches: most lines then meet a compiled plan of
                # their template (the fast path) rather than the general one.
                for start in range(0, len(lines), 50):
                    sock.sendall("".join(line + "\n" for line, _, _ in
                                         lines[start:start + 50]).encode())
                    listener.wait_stdout(min(start + 50, len(lines)))
            self.assertEqual(listener.stop(), 0)
            records = [json.loads(r) for r in
                       bytes(listener.out).splitlines()]
        self.assertEqual([r["event"] for r in records],
                         [line for line, _, _ in lines])
        for record, (line, fields, kind) in zip(records, lines):
            self.assertEqual(record["fields"], fields, line)
            self.assertEqual(record["kind"], kind, line)

    def test_plans_and_the_general_path_agree(self):
        # The same lines through the general path, and through a formatter
        # whose plans know their templates: the same JSON, byte for byte.
        lines = [(line + "\n").encode() for line, _, _ in
                 self.lines(7, 600)]
        general = [lec.json_text(line[:-1].decode(), lec.iso_time(0.0),
                                 "p").encode() for line in lines]
        formatter = lec.JsonFormatter()
        block = b"".join(lines)
        for _ in range(3):
            out = formatter.format(block, lec.split_lines(block), "p", 0.0,
                                   False)
        self.assertGreater(formatter.plans(), 5)
        self.assertEqual(out.splitlines(keepends=True), general)


if __name__ == "__main__":
    unittest.main()
