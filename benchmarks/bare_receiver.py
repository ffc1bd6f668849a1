"""A receiver that does no work: the floor under the listener's numbers.

One selectors loop, recv_into a buffer of the listener's size, write what
came to stdout; no framing, no counting, no formats.  Whatever it loses
going from one connection to several is the kernel's and the machine's,
not the listener's.  Run as: python3 bare_receiver.py HOST PORT
"""

import os
import selectors
import signal
import socket
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
from listen_events_cybertrace import RECV_BUFFER, RECV_SIZE  # noqa: E402


def main() -> int:
    host, port = sys.argv[1], int(sys.argv[2])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server = socket.create_server((host, port))
    # The listener's buffers, so that both meet the same kernel.
    server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECV_BUFFER)
    server.setblocking(False)
    selector = selectors.DefaultSelector()
    selector.register(server, selectors.EVENT_READ)
    buffer = bytearray(RECV_SIZE)
    view = memoryview(buffer)
    out = sys.stdout.fileno()
    while True:
        for key, _ in selector.select():
            if key.fileobj is server:
                conn, _ = server.accept()
                conn.setblocking(False)
                selector.register(conn, selectors.EVENT_READ)
                continue
            try:
                size = key.fileobj.recv_into(buffer)
            except BlockingIOError:
                continue
            if not size:
                selector.unregister(key.fileobj)
                key.fileobj.close()
                continue
            written = 0
            while written < size:
                written += os.write(out, view[written:size])


if __name__ == "__main__":
    sys.exit(main())
