"""A stand-in for CyberTrace's input port, built from cybertrace-protocol.md.

It reads the X-KF- flags from the first bytes of a connection (they may
arrive glued to the first event), answers X-KF-ReplyBackPING with PONG,
detects the documented test indicators, and sends its detections back on
the connection (X-KF-ReplyBack) or to an output address, followed by one
LookupFinished event per event when X-KF-SendFinishedEvent is set.
"""

from __future__ import annotations

import re
import socket
import threading

import support  # noqa: F401  (puts the scripts on sys.path)
import listen_events_cybertrace as lec

FLAGS = (b"X-KF-SendFinishedEvent", b"X-KF-ReplyBack", b"X-KF-SaveStatistic")
PING = b"PING"  # only right after X-KF-ReplyBack

INDICATORS = {
    "http://fakess123.nu": "KL_Malicious_URL",
    "http://fakess123ap.nu": "KL_Phishing_URL",
    "http://fakess123r.nu": "KL_Ransomware_URL",
    "http://a7396d61caffe18a4cffbb3b428c9b60.com": "KL_BotnetCnC_URL",
    "http://5a015004f9fc05290d87e86d69c4b237.com": "KL_BotnetCnC_URL",
    "http://b046f5b25458638f6705d53539c79f62.com": "KL_APT_URL",
    "http://e593461621ee0f9134c632d00bf108fd.com/.i": "KL_IoT_URL",
    "192.0.2.0": "KL_IP_Reputation",
    "192.0.2.1": "KL_IP_Reputation",
    "192.0.2.4": "KL_APT_IP",
    "C912705B4BBB14EC7E78FA8B370532C9": "KL_Malicious_Hash_MD5",
    "776735A8CA96DB15B422879DA599F474": "KL_Malicious_Hash_MD5",
    "7A2E65A0F70EE0615EC0CA34240CF082": "KL_APT_Hash",
    "60300A92E1D0A55C7FDD360EE40A9DC1": "KL_Mobile_Malicious_Hash",
    "001F6251169E6916C455495050A3FB8D": "KL_Mobile_BotnetCnC_Hash",
    "D8C1F5B4AD32296649FF46027177C594": "KL_Vulnerable_File_Hash",
    "7A8F30B40C6564EFF95E678F7C43346C": "KL_ICS_Hash",
}
_INDICATOR = re.compile(
    r"(?<![\w.])(%s)(?![\w.])" % "|".join(
        re.escape(i) for i in sorted(INDICATORS, key=len, reverse=True)),
    re.IGNORECASE)
_CANONICAL = {i.lower(): i for i in INDICATORS}


def read_flags(sock: socket.socket) -> tuple:
    """Return (flags, bytes after them) from the start of a connection."""
    buf = b""
    flags = []
    while True:
        if flags and flags[-1] == b"X-KF-ReplyBack" and buf.startswith(PING):
            flags.append(PING)
            return flags, buf[len(PING):]
        token = next((f for f in FLAGS if buf.startswith(f)), None)
        if token is not None:
            flags.append(token)
            buf = buf[len(token):]
            continue
        wanted = FLAGS + ((PING,) if flags and flags[-1] ==
                          b"X-KF-ReplyBack" else ())
        if buf and not any(w.startswith(buf) for w in wanted):
            return flags, buf
        data = sock.recv(65536)
        if not data:
            return flags, buf
        buf += data


def detections(event: str) -> list:
    """Return the detection events CyberTrace would emit for event."""
    found = []
    for match in _INDICATOR.finditer(event):
        indicator = _CANONICAL[match.group(1).lower()]
        kind = "url" if indicator.startswith("http") else \
            "ip" if indicator[0].isdigit() and "." in indicator else "md5"
        values = {"url": "-", "ip": "-", "md5": "-"}
        values[kind] = indicator
        found.append(
            "- category=%s matchedIndicator=%s url=%s src=- ip=%s md5=%s "
            "sha1=- sha256=- usrName=- confidence=100"
            % (INDICATORS[indicator], indicator, values["url"], values["ip"],
               values["md5"]))
    return found


def finished_event(found: list) -> str:
    totals = {}
    for detection in found:
        category = detection.split("category=")[1].split()[0]
        totals[category] = totals.get(category, 0) + 1
    return "eventName=LookupFinished sent_events=%d total=%s" % (
        len(found), "".join("%s:%d;" % item for item in totals.items()))


class FakeCyberTrace:
    """Serve CyberTrace's input protocol on a free loopback port."""

    def __init__(self, output: tuple | None = None, pong: bytes = b"PONG",
                 answer: bool = True) -> None:
        self.output = output
        self.pong = pong
        self.answer = answer
        self.lock = threading.Lock()
        self.connections = []  # (flags, raw bytes after the flags)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.address = self.server.getsockname()[:2]
        self.threads = []
        self.open = []
        self.acceptor = threading.Thread(target=self.accept_loop, daemon=True)
        self.acceptor.start()

    def accept_loop(self) -> None:
        while True:
            try:
                sock, _ = self.server.accept()
            except OSError:
                return
            with self.lock:
                self.open.append(sock)
            thread = threading.Thread(target=self.handle, args=(sock,),
                                      daemon=True)
            thread.start()
            self.threads.append(thread)

    def handle(self, sock: socket.socket) -> None:
        sock.settimeout(15)
        record = [[], bytearray()]
        with self.lock:
            self.connections.append(record)
        try:
            flags, rest = read_flags(sock)
            record[0] = flags
            if PING in flags:
                sock.sendall(self.pong)
                return
            self.serve_events(sock, flags, rest, record[1])
        except OSError:
            pass
        finally:
            sock.close()

    def serve_events(self, sock, flags, rest, raw) -> None:
        reply_back = b"X-KF-ReplyBack" in flags
        send_finished = b"X-KF-SendFinishedEvent" in flags
        out = None
        if not reply_back and self.output is not None:
            out = socket.create_connection(self.output, timeout=15)
        try:
            framer = lec.EventFramer()
            chunks = [rest] if rest else []
            for data in self.chunks(sock, chunks):
                with self.lock:
                    raw += data
                block = framer.feed(data)
                if block and self.answer:
                    self.respond(block, sock if reply_back else out,
                                 send_finished)
            block = framer.close()
            if block and self.answer:
                self.respond(block, sock if reply_back else out,
                             send_finished)
        finally:
            if out is not None:
                out.close()

    @staticmethod
    def chunks(sock, first):
        yield from first
        yield from lec.chunk_receive(sock)

    def respond(self, block: bytes, peer, send_finished: bool) -> None:
        lines = []
        for event in bytes(block).decode("utf-8", "replace")[:-1].split("\n"):
            found = detections(event)
            lines.extend(found)
            if send_finished:
                lines.append(finished_event(found))
        if lines and peer is not None:
            peer.sendall("".join(line + "\n" for line in lines).encode())

    def received(self) -> bytes:
        """Return every byte received after the flags, all connections."""
        with self.lock:
            return b"".join(bytes(raw) for _, raw in self.connections)

    def flags(self) -> list:
        with self.lock:
            return [list(flags) for flags, _ in self.connections]

    def close(self) -> None:
        try:
            # On Linux, close() alone does not wake a thread in accept().
            self.server.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.server.close()
        with self.lock:
            for sock in self.open:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self.acceptor.join(15)
        for thread in self.threads:
            thread.join(15)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
