"""-f json on each of the templates Kaspersky ships, as CyberTrace sends them.

The listener runs in a subprocess and takes the events over real sockets:
the fixture's lines (fixtures/cybertrace-events.txt, a copy of the team's
shared sample events), CEF lines with every escape, a syslog <PRI> first,
and events long enough to be cut into pieces.
"""

from __future__ import annotations

import json
import unittest

from support import ROOT, Listener

FIXTURE = (ROOT / "tests" / "fixtures" / "cybertrace-events.txt"
           ).read_text(encoding="utf-8").splitlines()
# What each fixture line is, in order: the tutorial's four detections, two
# alerts of the default template, a CEF alert, a detection of the
# "|"-separated template, and the event that closes an answer.
FIXTURE_KINDS = ["detection"] * 4 + ["alert"] * 3 + ["detection", "finished"]
CEF_ALERT = {
    "cefVersion": "0", "deviceVendor": "Kaspersky Lab",
    "deviceProduct": "Kaspersky CyberTrace for ArcSight",
    "deviceVersion": "2.0", "deviceEventClassId": "1",
    "name": "CyberTrace Service Event", "severity": "4",
    "reason": "KL_ALERT_UpdatedFeed",
    "msg": "feed=Malicious_URL_Data_Feed.json", "records": "1020"}
# Kaspersky's ArcSight detection template (online help 197106), filled in.
CEF_DETECTION = (
    "CEF:0|Kaspersky|Kaspersky CyberTrace for ArcSight|2.0|2|CyberTrace "
    "Detection Event|8| reason=KL_Malicious_URL cs5Label=MatchedIndicator "
    "cs5=http://fakess123.nu request=http://fakess123.nu src=198.51.100.7")
# RSA NetWitness's templates start with a syslog priority.
PRI_ALERT = ("<232>%CyberTrace:ALERT_EVENT alert=KL_ALERT_UpdatedFeed "
             "feed=Phishing_URL_Data_Feed.json records=200473")


def records_of(listener: Listener) -> list:
    return [json.loads(line) for line in bytes(listener.out).splitlines()]


def send_batches(listener: Listener, lines: list, times: int) -> list:
    """Send the lines times over on one connection, a batch at a time
    (the later batches meet the plans the first built); return the
    records."""
    with listener.connect() as sock:
        for number in range(1, times + 1):
            sock.sendall("".join(line + "\n" for line in lines).encode())
            listener.wait_stdout(number * len(lines))
    return records_of(listener)


class TemplateTest(unittest.TestCase):
    def test_every_fixture_line_gets_its_kind(self):
        self.assertEqual(len(FIXTURE), len(FIXTURE_KINDS))
        with Listener("-f", "json") as listener:
            records = send_batches(listener, FIXTURE, 3)
            self.assertEqual(listener.stop(), 0)
        self.assertEqual([r["event"] for r in records], FIXTURE * 3)
        self.assertEqual([r["kind"] for r in records], FIXTURE_KINDS * 3)
        # The same JSON, whether a plan or the general path made it.
        batches = [[(r["kind"], r["fields"]) for r in records[i::9]]
                   for i in range(9)]
        for batch in batches:
            self.assertEqual(batch[0], batch[1])
            self.assertEqual(batch[0], batch[2])

    def test_the_cef_lines_get_their_header_fields(self):
        with Listener("-f", "json") as listener:
            records = send_batches(listener, [FIXTURE[6], CEF_DETECTION], 2)
        for alert, detection in (records[0:2], records[2:4]):
            self.assertEqual(alert["kind"], "alert")
            self.assertEqual(alert["fields"], CEF_ALERT)
            self.assertEqual(alert["event"], FIXTURE[6])
            self.assertEqual(detection["kind"], "detection")
            self.assertEqual(detection["fields"], {
                "cefVersion": "0", "deviceVendor": "Kaspersky",
                "deviceProduct": "Kaspersky CyberTrace for ArcSight",
                "deviceVersion": "2.0", "deviceEventClassId": "2",
                "name": "CyberTrace Detection Event", "severity": "8",
                "reason": "KL_Malicious_URL", "cs5Label": "MatchedIndicator",
                "cs5": "http://fakess123.nu",
                "request": "http://fakess123.nu", "src": "198.51.100.7"})

    def test_cef_escapes_are_undone(self):
        header = (r"CEF:0|Kasper\|sky|Cyber\\Trace|2.0|7|"
                  r"CyberTrace Detection Event|8|")
        events = [
            header + r" msg=a\=b c:\\dir\\ two\nlines\r end fname=x|y=z "
                     r"cs1=spaces  inside   act=\\n",
            r"<134>Sep 19 08:26:10 host " + header + "src=192.0.2.1",
        ]
        with Listener("-f", "json") as listener:
            records = send_batches(listener, events, 2)
        for record in records[0:4:2]:
            self.assertEqual(record["kind"], "detection")  # by its Name
            self.assertEqual(record["fields"], {
                "cefVersion": "0", "deviceVendor": "Kasper|sky",
                "deviceProduct": "Cyber\\Trace", "deviceVersion": "2.0",
                "deviceEventClassId": "7",
                "name": "CyberTrace Detection Event", "severity": "8",
                # Values run to the next " key=", "|" is text, and an
                # escaped backslash before "n" is no line end.
                "msg": "a=b c:\\dir\\ two\nlines\r end",
                "fname": "x|y=z", "cs1": "spaces  inside", "act": "\\n"})
        for record in records[1:4:2]:
            self.assertEqual(record["fields"]["pri"], "134")
            self.assertEqual(record["fields"]["deviceVendor"], "Kasper|sky")
            self.assertEqual(record["fields"]["src"], "192.0.2.1")

    def test_a_pri_is_taken_off_and_kept(self):
        events = [PRI_ALERT, "<13>category=KL_Malicious_URL "
                  "matchedIndicator=http://fakess123.nu url=http://"
                  "fakess123.nu", "<14>no fields here"]
        with Listener("-f", "json") as listener:
            records = send_batches(listener, events, 2)
        for alert, detection, other in (records[0:3], records[3:6]):
            self.assertEqual(alert["kind"], "alert")
            self.assertEqual(alert["fields"], {
                "pri": "232", "alert": "KL_ALERT_UpdatedFeed",
                "feed": "Phishing_URL_Data_Feed.json", "records": "200473"})
            self.assertEqual(alert["event"], PRI_ALERT)
            # No longer stuck to the first key.
            self.assertEqual(detection["kind"], "detection")
            self.assertEqual(detection["fields"], {
                "pri": "13", "category": "KL_Malicious_URL",
                "matchedIndicator": "http://fakess123.nu",
                "url": "http://fakess123.nu"})
            self.assertEqual(other["kind"], "unknown")
            self.assertEqual(other["fields"], {"pri": "14"})

    def test_an_event_without_a_marker_is_unknown(self):
        with Listener("-f", "json") as listener:
            records = send_batches(listener, [
                "no fields here", "- src=192.0.2.1 dst=192.0.2.2",
                "Apr 16 09:05:41 alert=ServiceStarted"], 2)
        self.assertEqual([r["kind"] for r in records], ["unknown"] * 6)

    def test_an_alert_key_gives_its_value_the_kind(self):
        # One shape, its alert key's value an alert or not: a plan made
        # for the one must not give its kind to the other.
        lines = ["- alert=KL_ALERT_UpdatedFeed context=%d" % n if n % 3 else
                 "- alert=Nothing context=%d" % n for n in range(30)]
        with Listener("-f", "json") as listener:
            records = send_batches(listener, lines, 3)
        self.assertEqual([r["kind"] for r in records],
                         ["unknown" if n % 3 == 0 else "alert"
                          for n in range(30)] * 3)
        self.assertEqual(records[31]["fields"], {
            "alert": "KL_ALERT_UpdatedFeed", "context": "1"})

    def test_escaped_output_has_kinds_and_fields_too(self):
        with Listener("-f", "json", "--escape") as listener:
            records = send_batches(listener, [FIXTURE[6], PRI_ALERT], 1)
        self.assertEqual([r["kind"] for r in records], ["alert", "alert"])
        self.assertEqual(records[0]["fields"], CEF_ALERT)
        self.assertEqual(records[1]["fields"]["pri"], "232")


class PieceTest(unittest.TestCase):
    def check_pieces(self, records: list, event: str, kind: str) -> None:
        self.assertEqual("".join(r["event"] for r in records), event)
        self.assertEqual([(r["piece"], r["last"]) for r in records],
                         [(n, n == len(records))
                          for n in range(1, len(records) + 1)])
        self.assertEqual({r["kind"] for r in records}, {kind})
        self.assertEqual([r["fields"] for r in records[1:]],
                         [{}] * (len(records) - 1))

    def test_pieces_of_a_split_event_say_so(self):
        detection, alert = FIXTURE[0], FIXTURE[4]
        with Listener("-f", "json", "--max-event-bytes", "100") as listener:
            with listener.connect() as sock:
                sock.sendall((detection + "\nshort=1\n" + alert +
                              "\n").encode())
                pieces = -(-len(detection) // 100)
                listener.wait_stdout(pieces + 2)
                # A peer that leaves mid-event: its last piece is the rest.
                sock.sendall(detection.encode())
            listener.wait_stdout(2 * pieces + 2)
            self.assertEqual(listener.stop(), 0)
            records = records_of(listener)
        first = records[:pieces]
        self.check_pieces(first, detection, "detection")
        # The first piece carries the fields its text holds.
        self.assertEqual(first[0]["fields"]["category"],
                         "KL_Malicious_Hash_MD5")
        self.assertEqual(first[0]["fields"]["matchedIndicator"],
                         "776735A8CA96DB15B422879DA599F474")
        short, whole = records[pieces:pieces + 2]
        self.assertEqual(short["event"], "short=1")
        self.assertEqual(whole["event"], alert)
        for record in (short, whole):
            self.assertNotIn("piece", record)
            self.assertNotIn("last", record)
        self.assertEqual(whole["kind"], "alert")
        self.check_pieces(records[pieces + 2:], detection, "detection")

    def test_pieces_under_the_buffer_budget_say_so(self):
        # An unfinished event past --max-buffer-bytes goes out in pieces
        # before its end has come.
        start = "CEF:0|Kaspersky|CyberTrace|2.0|2|CyberTrace Detection " \
            "Event|8| cs5=" + "x" * 3000
        with Listener("-f", "json", "--max-buffer-bytes", "2000") \
                as listener:
            with listener.connect() as sock:
                sock.sendall(start.encode())
                listener.wait_stdout(1)
                sock.sendall(b" src=192.0.2.1\n")
                listener.wait_for(lambda: b'"last":true' in listener.out)
            records = records_of(listener)
        self.check_pieces(records, start + " src=192.0.2.1", "detection")
        self.assertEqual(records[0]["fields"]["deviceEventClassId"], "2")


def documented_samples() -> tuple:
    """Return docs/listener.md's JSON samples: ([(line, its JSON)], [the
    JSON of pieces])."""
    page = (ROOT / "docs" / "listener.md").read_text(encoding="utf-8")
    part = page[page.index("### Kinds and templates"):
                page.index("### Prefixes")]
    shown = [line[4:] for line in part.splitlines()
             if line.startswith("    ")]
    pairs = [(line, after) for line, after in zip(shown, shown[1:])
             if not line.startswith("{") and after.startswith("{") and
             '"piece":' not in after]
    pieces = [line for line in shown if line.startswith("{") and
              '"piece":' in line]
    return pairs, pieces


class DocumentedSamplesTest(unittest.TestCase):
    """What docs/listener.md shows is what the listener writes today."""

    LEFT_OUT = {"time", "peer", "listen", "event"}  # as the page says

    def assert_shown(self, shown: str, record: dict, left_out: set) -> None:
        kept = {key: value for key, value in record.items()
                if key not in left_out}
        # Compared as text: the members' order and escapes are shown too.
        self.assertEqual(json.dumps(kept, ensure_ascii=False,
                                    separators=(",", ":")), shown)

    def test_each_sample_is_the_listener_s_json(self):
        pairs, pieces = documented_samples()
        self.assertGreaterEqual(len(pairs), 7)
        self.assertEqual(len(pieces), 3)
        with Listener("-f", "json") as listener:
            records = send_batches(listener, [line for line, _ in pairs], 1)
            self.assertEqual(listener.stop(), 0)
        for (line, shown), record in zip(pairs, records):
            with self.subTest(line):
                self.assertEqual(record["event"], line)
                self.assertEqual(list(record)[:4],
                                 ["time", "peer", "listen", "kind"])
                self.assert_shown(shown, record, self.LEFT_OUT)
        with Listener("-f", "json", "--max-event-bytes", "100") as listener:
            records = send_batches(listener, [FIXTURE[0]], 1)
            self.assertEqual(listener.stop(), 0)
        self.assertEqual(len(records), 5)
        for shown, record in zip(pieces, [records[0], records[1],
                                          records[-1]]):
            self.assert_shown(shown, record, {"time", "peer", "listen"})


if __name__ == "__main__":
    unittest.main()


class LongEventTest(unittest.TestCase):
    def test_fields_come_from_the_first_16_kib_of_a_long_event(self):
        # 200 KiB of fields: the event is kept whole, its fields are those
        # of its first 16 Ki characters but the last (whose value may run
        # on past them), and its kind is still read from all of it.
        pairs = ["key%05d=value%05d" % (n, n) for n in range(10000)]
        event = " ".join(pairs) + " alert=KL_ALERT_UpdatedFeed"
        head = event[:16 * 1024]
        whole = head.count("=") - 1  # the fields wholly in the first 16 Ki
        with Listener("-f", "json") as listener:
            with listener.connect() as sock:
                sock.sendall(event.encode() + b"\n" + b"short=1\n")
            listener.wait_stdout(2)
        long, short = records_of(listener)
        self.assertEqual(long["event"], event)
        self.assertEqual(long["kind"], "alert")
        self.assertEqual(list(long["fields"]),
                         ["key%05d" % n for n in range(whole)])
        self.assertEqual(long["fields"]["key%05d" % (whole - 1)],
                         "value%05d" % (whole - 1))
        self.assertEqual(short["fields"], {"short": "1"})

    def test_a_short_event_keeps_every_field(self):
        pairs = ["k%d=v" % n for n in range(1800)]  # 13 KiB
        with Listener("-f", "json") as listener:
            with listener.connect() as sock:
                sock.sendall(" ".join(pairs).encode() + b"\n")
            listener.wait_stdout(1)
        self.assertEqual(len(records_of(listener)[0]["fields"]), 1800)
