#!/usr/bin/env python3
"""Send files over one connection each, all at once, for the benchmark.

    python3 send_parts.py sendfile|sendall|nc PORT FILE...

Connects every connection first, prints "ready", then waits for a line on
stdin before sending, so that the benchmark's clock starts with the first
byte, not with this interpreter's start.  sendfile hands each file to the
kernel (as socat or a C relay would stream it); sendall sends it from
memory in one call (as a Python sender would); nc runs one `nc -N` per
file, fed through a pipe as `cat FILE | nc -N` would.  Exit 0 once all is
sent.
"""

import os
import shutil
import socket
import subprocess
import sys
import threading
import time


def send_file(sock: socket.socket, path: str) -> None:
    with open(path, "rb") as f:
        sock.sendfile(f)


def send_all(sock: socket.socket, data: bytes) -> None:
    sock.sendall(data)


def connected_to(port: int) -> int:
    """Return how many established connections this host has to port."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for row in f.read().splitlines()[1:]:
                fields = row.split()
                if int(fields[2].rsplit(":", 1)[1], 16) == port and \
                        fields[3] == "01":
                    count += 1
    return count


def pipe_file(path: str, pipe: int) -> None:
    """Move a file into a pipe without copying it through this process."""
    with open(path, "rb") as f:
        while os.splice(f.fileno(), pipe, 1 << 20):
            pass
    os.close(pipe)


def run_nc(port: int, paths: list) -> int:
    # As `cat file | nc -N`: each nc connects at once and then reads its
    # pipe, which this process fills with splice() once told to go.
    procs, pipes = [], []
    for _ in paths:
        read_end, write_end = os.pipe()
        procs.append(subprocess.Popen(
            [shutil.which("nc"), "-N", "127.0.0.1", str(port)],
            stdin=read_end))
        os.close(read_end)
        pipes.append(write_end)
    deadline = time.monotonic() + 60
    while connected_to(port) < len(paths):
        if time.monotonic() > deadline:
            raise SystemExit("send_parts: nc did not connect")
        time.sleep(0.01)
    print("ready", flush=True)
    sys.stdin.readline()
    threads = [threading.Thread(target=pipe_file, args=(path, pipe))
               for path, pipe in zip(paths, pipes)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return max(proc.wait() for proc in procs)


def main() -> int:
    mode, port, paths = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    if mode == "nc":
        return run_nc(port, paths)
    sockets = [socket.create_connection(("127.0.0.1", port), timeout=600)
               for _ in paths]
    if mode == "sendfile":
        work = [(send_file, sock, path) for sock, path in zip(sockets, paths)]
    else:
        work = []
        for sock, path in zip(sockets, paths):
            with open(path, "rb") as f:
                work.append((send_all, sock, f.read()))
    print("ready", flush=True)
    sys.stdin.readline()
    threads = [threading.Thread(target=func, args=(sock, what))
               for func, sock, what in work]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for sock in sockets:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
