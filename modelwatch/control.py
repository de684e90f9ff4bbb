"""The daemon's control socket, `<state_dir>/control.sock`: where `modelwatch explain` asks
the running daemon (SPEC §3).

Why a Unix socket in `state_dir`: it needs no port and no `health_listen`; only the daemon's
own user (and root) can connect, since the directory is 0700 and the socket 0600, whereas the
health port is reachable by every container of a pod; and the command finds it through the
same configuration that names the state store.

Protocol: one request per connection, a JSON object on one line of at most `MAX_REQUEST`
bytes (`{"explain": "/abs/path"}`); the answer is one JSON object on one line, `{"ok": true,
"answer": ...}` or `{"ok": false, "error": "..."}`, then the daemon closes the connection.
The server runs on one thread named `control`, one client at a time, with a state-store
connection of its own; a client gets `TIMEOUT` seconds to send its request, so a silent one
holds the others up that long at most, and `stop()` returns within `POLL` seconds of that.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import structlog

from modelwatch.errors import NoAnswer
from modelwatch.state import Store

log = structlog.get_logger("modelwatch.control")

SOCKET_NAME = "control.sock"
MAX_REQUEST = 64 * 1024
MAX_ANSWER = 16 * 1024 * 1024
TIMEOUT = 5.0
POLL = 0.5
_UNIX_PATH_MAX = 107  # bytes of sun_path, without the terminating NUL

Handler = Callable[[Mapping[str, Any], Store], Any]


def socket_path(state_dir: str) -> str:
    return os.path.join(state_dir, SOCKET_NAME)


@contextlib.contextmanager
def _address(path: str) -> Iterator[str]:
    """`path` as an AF_UNIX address: itself, or when too long for one, the same file
    reached through `/proc/self/fd/N` of its directory (pytest's temp dirs are long)."""
    if len(os.fsencode(path)) <= _UNIX_PATH_MAX:
        yield path
        return
    fd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{os.path.basename(path)}"
    finally:
        os.close(fd)


class ControlServer:
    """Answers requests on `<state_dir>/control.sock` with `handle(request, store)`."""

    def __init__(self, state_dir: str, db_path: str, handle: Handler) -> None:
        self.path = socket_path(state_dir)
        self._db_path = db_path
        self._handle = handle
        self._stopping = threading.Event()
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind (replacing a socket a killed daemon left: the caller holds the state lock)
        and serve from a thread named `control`."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with _address(self.path) as address:
                listener.bind(address)
            os.chmod(self.path, 0o600)
            listener.listen(16)
        except OSError:
            listener.close()
            raise
        listener.settimeout(POLL)
        self._listener = listener
        self._thread = threading.Thread(
            target=self._serve, args=(listener,), name="control", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop serving, join the thread, remove the socket."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    def _serve(self, listener: socket.socket) -> None:
        store = Store(self._db_path)
        try:
            while not self._stopping.is_set():
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    continue
                except OSError:  # out of descriptors, say: try again shortly
                    self._stopping.wait(POLL)
                    continue
                with conn:
                    self._answer(conn, store)
        finally:
            store.close()

    def _answer(self, conn: socket.socket, store: Store) -> None:
        try:
            request = _request(_read_line(conn, MAX_REQUEST, time.monotonic() + TIMEOUT))
            reply = {"ok": True, "answer": self._handle(request, store)}
        except (OSError, ValueError) as exc:  # a bad or silent client
            reply = {"ok": False, "error": str(exc)}
        except Exception as exc:  # a bug answering must not stop the server
            log.exception("control_request_failed")
            reply = {"ok": False, "error": f"internal error: {exc!r}"}
        with contextlib.suppress(OSError):
            conn.settimeout(TIMEOUT)
            conn.sendall(json.dumps(reply, ensure_ascii=False).encode() + b"\n")


def _request(line: bytes) -> dict[str, Any]:
    request = json.loads(line)
    if not isinstance(request, dict):
        raise ValueError("a request is one JSON object")  # noqa: TRY004 (answered as bad input)
    return request


def _read_line(conn: socket.socket, limit: int, deadline: float) -> bytes:
    """Bytes up to the first newline (or the peer's end of input), within `limit` bytes
    and by `deadline` (monotonic); OSError or ValueError otherwise."""
    data = bytearray()
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no complete line in time")
        conn.settimeout(left)
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
        if len(data) > limit:
            raise ValueError(f"longer than {limit} bytes")
    return bytes(data.split(b"\n", 1)[0])


def ask(state_dir: str, request: Mapping[str, Any], timeout: float = TIMEOUT) -> Any:
    """The running daemon's answer to `request`; NoAnswer when none answers."""
    path = socket_path(state_dir)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        try:
            conn.settimeout(timeout)
            with _address(path) as address:
                conn.connect(address)
            conn.sendall(json.dumps(request).encode() + b"\n")
            line = _read_line(conn, MAX_ANSWER, time.monotonic() + timeout)
        except (FileNotFoundError, ConnectionRefusedError):
            raise NoAnswer("no daemon is running on this state directory") from None
        except (OSError, ValueError) as exc:
            raise NoAnswer(f"the daemon did not answer: {exc}") from None
    try:
        reply = json.loads(line)
    except ValueError:
        raise NoAnswer("the daemon's answer is not JSON") from None
    if not isinstance(reply, dict) or not reply.get("ok"):
        error = reply.get("error") if isinstance(reply, dict) else None
        raise NoAnswer(f"the daemon could not answer: {error or 'no answer'}")
    return reply.get("answer")
