"""The tutorial's listener, unchanged but for its address: the baseline.

4096-byte recv, buff += data, split and print per event, one peer at a time.
Run as: python3 tutorial_listener.py HOST PORT
"""

import socket
import sys

LISTEN_ADDR = sys.argv[1]
LISTEN_PORT = int(sys.argv[2])


def chunk_receive(connection):
    data = None
    while data != b'':
        data = connection.recv(4096)
        yield data


def parse_response(connection):
    buff = b''
    for data in chunk_receive(connection):
        buff += data
        while b'\n' in buff:
            event, buff = buff.split(b'\n', 1)
            yield event


def main():
    server_socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    print("Starting on {}:{}".format(LISTEN_ADDR, LISTEN_PORT))
    server_socket.bind((LISTEN_ADDR, LISTEN_PORT))
    server_socket.listen()
    while True:
        connection, client_address = server_socket.accept()
        try:
            print("Connection from {}".format(client_address))
            for event in parse_response(connection):
                print("Received:\n{}".format(event.decode()))
        finally:
            connection.close()


if __name__ == '__main__':
    main()
