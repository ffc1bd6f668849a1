#!/usr/bin/env python3
"""Send files over one connection each, all at once, for the benchmark.

    python3 send_parts.py sendfile|sendall|nc PORT FILE...

Connects every connection first, prints "ready", then waits for a line on
stdin before sending, so that the benchmark's clock starts with the first
byte, not with this interpreter's start.  sendfile hands each file to the
kernel (as socat or a C relay would stream it); sendall sends it from
memory in one call (as a Python sender would); nc starts one `nc -N` per
file once told to go (it connects then: a few milliseconds more, as when
users pipe files into nc).  Exit 0 once all is sent.
"""

import shutil
import socket
import subprocess
import sys
import threading


def send_file(sock: socket.socket, path: str) -> None:
    with open(path, "rb") as f:
        sock.sendfile(f)


def send_all(sock: socket.socket, data: bytes) -> None:
    sock.sendall(data)


def run_nc(port: int, paths: list) -> int:
    nc = shutil.which("nc")
    print("ready", flush=True)
    sys.stdin.readline()
    procs = []
    for path in paths:
        with open(path, "rb") as f:
            procs.append(subprocess.Popen([nc, "-N", "127.0.0.1", str(port)],
                                          stdin=f))
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
