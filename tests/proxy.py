"""A TCP forwarder on 127.0.0.1 that a test controls, to partition one client from a server.

`block()` stops passing bytes in both directions and stops accepting: connections stay open
and hang, as they do when a network path drops packets (not a refused connection, which a
client notices at once). `unblock()` lets everything flow again. One thread runs it; `close()`
stops and joins it and closes every socket.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
from types import TracebackType


class Proxy:
    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ, None)
        self._blocked = threading.Event()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="proxy", daemon=True)
        self._thread.start()

    def block(self) -> None:
        self._blocked.set()

    def unblock(self) -> None:
        self._blocked.clear()

    def _run(self) -> None:
        while not self._closing.is_set():
            if self._blocked.is_set():
                self._closing.wait(0.02)
                continue
            for key, _mask in self._selector.select(0.05):
                if key.data is None:
                    self._accept()
                else:
                    self._pump(key.fileobj, key.data)  # type: ignore[arg-type]

    def _accept(self) -> None:
        try:
            client, _address = self._listener.accept()
        except BlockingIOError:
            return
        try:
            upstream = socket.create_connection(self.target, timeout=2)
        except OSError:
            client.close()
            return
        for one, other in ((client, upstream), (upstream, client)):
            one.setblocking(True)
            self._selector.register(one, selectors.EVENT_READ, other)

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            data = source.recv(65536)
            if data:
                sink.sendall(data)
                return
        except OSError:
            pass
        for one in (source, sink):
            with contextlib.suppress(KeyError, ValueError):  # the other side's close did it
                self._selector.unregister(one)
            one.close()

    def close(self) -> None:
        self._closing.set()
        self._thread.join(5)
        for key in list(self._selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        self._selector.close()

    def __enter__(self) -> Proxy:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
