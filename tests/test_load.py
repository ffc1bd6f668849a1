"""The listener under load: fair turns between peers, bounded memory."""

from __future__ import annotations

import os
import tempfile
import threading
import time
import unittest

from support import TIMEOUT, Listener

# Events with many fields: JSON formats them far slower than loopback
# carries them, so a flooding peer always has a full buffer waiting.
FLOOD_EVENT = b" ".join(b"f%d=%d" % (i, i) for i in range(16)) + b"\n"
FLOOD_BYTES = 32 * 1024 * 1024


class FileWatch:
    """Find a byte string in a file that grows, reading each byte once."""

    def __init__(self, path: str, needle: bytes) -> None:
        self.path = path
        self.needle = needle
        self.offset = 0
        self.tail = b""

    def found(self) -> bool:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        self.offset += len(data)
        window = self.tail + data
        self.tail = window[-len(self.needle):]
        return self.needle in window


class FairnessTest(unittest.TestCase):
    def test_a_flooding_peer_does_not_hold_up_another_peers_event(self):
        with tempfile.TemporaryDirectory() as tmp:
            out_path = os.path.join(tmp, "out")
            with Listener("-f", "json", "-o", out_path) as listener:
                stop = threading.Event()
                flood = {"sent": 0, "finished": False}

                def send_flood():
                    chunk = FLOOD_EVENT * (1024 * 1024 // len(FLOOD_EVENT))
                    try:
                        with listener.connect() as sock:
                            while not stop.is_set() and \
                                    flood["sent"] < FLOOD_BYTES:
                                sock.sendall(chunk)
                                flood["sent"] += len(chunk)
                            flood["finished"] = not stop.is_set()
                    except OSError:
                        pass
                thread = threading.Thread(target=send_flood)
                thread.start()
                try:
                    # The flood is under way once its events reach the file.
                    listener.wait_for(lambda: os.path.exists(out_path) and
                                      os.path.getsize(out_path) > 1 << 20,
                                      what="the flood's events in the file")
                    watch = FileWatch(out_path, b'"event":"single=event"')
                    sent = time.monotonic()
                    listener.send(b"single=event\n")
                    listener.wait_for(watch.found, what="the single event")
                    took = time.monotonic() - sent
                    finished = flood["finished"]
                    sent_bytes = flood["sent"]
                finally:
                    stop.set()
                    thread.join(TIMEOUT)
                # Starved, the event would come only after the flood's last
                # bytes; the delay itself is the benchmark's to report.
                self.assertFalse(finished, "the single event came %.3f s "
                                 "after it was sent, once the flood of %d "
                                 "bytes was over" % (took, sent_bytes))
                self.assertEqual(listener.stop(), 0)


if __name__ == "__main__":
    unittest.main()
