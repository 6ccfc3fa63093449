"""A network outage for tests: a TCP relay in front of a local endpoint (the moto S3 server), which a
test cuts mid-run and restores, as an object store that went away and came back."""

from __future__ import annotations

import socket
import threading


class Relay:
    """Forwards 127.0.0.1:`port` to 127.0.0.1:`target`. `cut()` refuses new connections and drops
    the open ones; `restore()` serves on the same port again."""

    def __init__(self, target: int):
        self.target = target
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # cut
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                _shut(client)
                client.close()
                continue
            with self._lock:
                self._open.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            _shut(s)

    def cut(self) -> None:
        _shut(self._listener)
        self._listener.close()
        with self._lock:
            for s in self._open:
                _shut(s)
            self._open.clear()

    def restore(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()


def _shut(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:  # closed already
        pass
