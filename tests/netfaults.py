"""A server that fails the way a stalled network does, for the push stage's tests. Loopback only.

SilentServer accepts connections (the kernel completes the handshake) and never answers: a stalled Hub. (A Hub that
answers with an error is the local Hub's fail_with, in tests/hubserver.py.)"""
import socket


class SilentServer:
    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)  # never accept()ed: connections complete, requests are never read or answered
        self.base = f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.sock.close()
