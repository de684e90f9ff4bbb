"""The NATS backend: JetStream Key-Value buckets, revision-checked writes.

Buckets (file storage, one value per key)::

    <prefix>-leases   key <root digest>                  "<node id>\\t<token>"; bucket TTL = lease
    <prefix>-units    key <root digest>.<unit digest>    history document (codec.encode_history)
    <prefix>-events   key <root digest>.<event id>.<n>   compressed body of an undelivered
                                                         event, in pieces of 256 KiB

Digests are sha256 hex (32 characters), as KV keys allow only a few characters; the document
carries the unit's path.

* acquire: read the lease's last record (held: who, and until about when); none, or the
  marker of a release: write it expecting that record's revision (0: none), which only one
  node can do (the bucket's TTL removes a lease nobody renews).
* renew: `update` expecting the revision our last write got; anything else is `LeaseLost`.
* commit: the event body is put first, then the history is updated expecting its revision
  (`create` for a new unit). JetStream has no multi-key transaction, so a body may be left
  without a history naming it (harmless: only ids in a history are redelivered), and the
  lease is not checked in the same step: fencing is by lease expiry with a margin (the
  coordinator), and the revision check keeps versions consistent whatever happens.
* release: delete the lease key expecting our revision.

The lease bucket's TTL is the lease length for every node: when the bucket exists with
another TTL than `lease_seconds`, the bucket's is used, and a warning says so.

TLS (`tls://` servers, or servers that require it) is spoken as `tls` says
(`modelwatch.nats_tls`); a certificate either side refuses is reported in the words of
`tls.refusal`.

nats-py is asyncio: the backend runs its own event loop on a thread (`aio.LoopThread`,
started at the first call, stopped by `close`); callers on any thread wait for each
operation up to twice `timeout` (a commit is two requests).
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import TypeVar

import structlog
from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.errors import NoServersError
from nats.js import JetStreamContext
from nats.js.api import RawStreamMsg, StorageType
from nats.js.errors import (
    APIError,
    BadRequestError,
    BucketNotFoundError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NotFoundError,
)
from nats.js.kv import KeyValue

from modelwatch.cluster.aio import LoopThread
from modelwatch.cluster.backend import (
    BackendUnavailable,
    Busy,
    Conflict,
    Lease,
    LeaseLost,
    Stored,
    Write,
)
from modelwatch.cluster.codec import decode_history, encode_history
from modelwatch.credentials import Scrubber
from modelwatch.nats_tls import CLOSE_SECONDS, TlsClient, open_connection
from modelwatch.tls import ClientTls, refusal

log = structlog.get_logger("modelwatch.cluster")
T = TypeVar("T")
_STREAM_IN_USE = 10058  # the bucket exists with another configuration
BODY_PIECE = 256 * 1024  # bytes of an event body per KV value (below any sane max_payload)


def _deleted(record: RawStreamMsg) -> bool:
    return bool((record.headers or {}).get("KV-Operation"))


def _busy(record: RawStreamMsg, lease_seconds: float) -> Busy:
    """Who holds the lease, and about how long it has left: the record's server time plus
    the TTL, against this node's clock (a hint: a standby still tries at least every third
    of a lease, whatever the clocks say)."""
    holder = (record.data or b"").decode(errors="replace").partition("\t")[0] or None
    if record.time is None:
        return Busy(holder)
    return Busy(holder, max(0.0, record.time.timestamp() + lease_seconds - time.time()))


def digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:32]


class NatsBackend:
    name = "nats"

    def __init__(
        self,
        servers: list[str],
        *,
        shown: str,
        prefix: str,
        timeout: float,
        lease_seconds: float,
        tls: ClientTls,
        scrub: Scrubber | None = None,
    ) -> None:
        """`servers` may carry credentials (from url_env / url_file): `scrub` removes them from
        every message; `shown` is what messages name instead."""
        self.shown = shown
        self.lease_seconds = lease_seconds
        self._servers = servers
        self._tls = tls
        self._host = urllib.parse.urlsplit(servers[0]).hostname or ""  # the verified name
        self._last_error: Exception | None = None  # what nats-py reported while connecting
        self._prefix = prefix
        self._timeout = timeout
        self._scrub = scrub or Scrubber()
        self._client: Client | None = None
        self._buckets: dict[str, KeyValue] = {}
        self._js: JetStreamContext | None = None
        self._loop = LoopThread("cluster-nats")
        self._connecting: asyncio.Lock | None = None

    # -- calls ------------------------------------------------------------------------------

    def _call(self, work: Callable[[], Awaitable[T]]) -> T:
        try:
            return self._loop.call(lambda: self._guarded(work), self._timeout * 2 + 1)
        except TimeoutError:
            raise BackendUnavailable(f"{self.shown}: no answer in time") from None

    async def _guarded(self, work: Callable[[], Awaitable[T]]) -> T:
        try:
            return await asyncio.wait_for(work(), self._timeout * 2)
        except (LeaseLost, Conflict, BackendUnavailable):
            raise
        except (NatsError, OSError, asyncio.TimeoutError) as exc:
            await self._drop_if_disconnected()
            raise self._failure(exc) from None

    def _failure(self, exc: BaseException) -> BackendUnavailable:
        # a failed connect raises NoServersError; why it failed went to the error callback
        cause = (self._last_error if isinstance(exc, NoServersError) else None) or exc
        text = refusal(cause, self._tls, self._host) or str(cause) or type(cause).__name__
        return BackendUnavailable(f"{self.shown}: {self._scrub(text)}")

    async def _drop_if_disconnected(self) -> None:
        client = self._client
        if client is not None and not client.is_connected:
            self._client, self._buckets, self._js = None, {}, None
            if not client.is_closed:
                await client.close()

    # -- connection and buckets ------------------------------------------------------------------

    async def _bucket(self, what: str) -> KeyValue:
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._client is None or not self._client.is_connected:
                await self._drop_if_disconnected()
                self._client = await self._connect()
            if what not in self._buckets:
                self._js = self._client.jetstream(timeout=self._timeout)
                self._buckets[what] = await self._open(self._js, what)
            return self._buckets[what]

    async def _connect(self) -> Client:
        client = TlsClient()
        self._last_error = None

        async def note(exc: Exception) -> None:  # failures surface as operation errors
            self._last_error = exc

        await open_connection(
            client,
            self._tls,
            close_within=min(self._timeout, CLOSE_SECONDS),
            servers=list(self._servers),
            name="modelwatch-cluster",
            allow_reconnect=False,  # the next operation reconnects; nothing is buffered
            connect_timeout=max(1, round(self._timeout)),
            error_cb=note,
        )
        return client

    async def _open(self, js: JetStreamContext, what: str) -> KeyValue:
        name = f"{self._prefix}-{what}"
        ttl = self.lease_seconds if what == "leases" else None
        try:
            kv = await js.key_value(name)
        except BucketNotFoundError:
            try:
                kv = await js.create_key_value(
                    bucket=name, history=1, ttl=ttl, storage=StorageType.FILE, direct=True
                )
            except BadRequestError as exc:
                if exc.err_code != _STREAM_IN_USE:
                    raise
                kv = await js.key_value(name)  # another node created it first
        if what == "leases":
            await self._adopt_ttl(kv, name)
        return kv

    async def _adopt_ttl(self, kv: KeyValue, name: str) -> None:
        ttl = (await kv.status()).ttl
        if ttl and abs(ttl - self.lease_seconds) > 1e-3:
            log.warning(
                "cluster_lease_seconds_differ",
                bucket=name,
                configured=self.lease_seconds,
                used=ttl,
                note="the bucket's TTL is every node's lease length",
            )
            self.lease_seconds = ttl

    # -- leases ----------------------------------------------------------------------------------

    def acquire(self, root: str, node: str, seconds: float) -> Lease | Busy:
        token = secrets.token_hex(8)

        async def work() -> Lease | Busy:
            kv = await self._bucket("leases")
            record = await self._lease_record(root)
            if record is not None and not _deleted(record):  # held: one read, no write
                return _busy(record, self.lease_seconds)
            last = record.seq if record is not None else 0  # 0: the key must not exist
            try:
                revision = await kv.update(digest(root), f"{node}\t{token}".encode(), last=last)
            except KeyWrongLastSequenceError:  # another node was quicker
                record = await self._lease_record(root)
                return Busy(None) if record is None else _busy(record, self.lease_seconds)
            return Lease(root, node, token, self.lease_seconds, revision)

        return self._call(work)

    async def _lease_record(self, root: str) -> RawStreamMsg | None:
        """The lease's last record (a value, or the marker a release left), if any."""
        js, name = self._js, f"{self._prefix}-leases"
        if js is None:  # the connection was dropped meanwhile
            raise BackendUnavailable(f"{self.shown}: not connected")
        try:
            return await js.get_msg(f"KV_{name}", subject=f"$KV.{name}.{digest(root)}", direct=True)
        except NotFoundError:
            return None

    async def _holder(self, kv: KeyValue, root: str) -> str | None:
        try:
            entry = await kv.get(digest(root))
        except KeyNotFoundError:
            return None
        return (entry.value or b"").decode(errors="replace").partition("\t")[0] or None

    def renew(self, lease: Lease) -> Lease:
        async def work() -> Lease:
            kv = await self._bucket("leases")
            value = f"{lease.node}\t{lease.token}".encode()
            try:
                revision = await kv.update(digest(lease.root), value, last=lease.revision)
            except KeyWrongLastSequenceError:
                raise LeaseLost(f"{lease.root}: the lease is no longer ours") from None
            return Lease(lease.root, lease.node, lease.token, lease.seconds, revision)

        return self._call(work)

    def release(self, lease: Lease) -> None:
        async def work() -> None:
            kv = await self._bucket("leases")
            try:
                await kv.delete(digest(lease.root), last=lease.revision)
            except (KeyWrongLastSequenceError, APIError):
                return  # not ours any more: nothing to give up

        self._call(work)

    def holder(self, root: str) -> str | None:
        async def work() -> str | None:
            return await self._holder(await self._bucket("leases"), root)

        return self._call(work)

    # -- histories and events --------------------------------------------------------------------

    def load(self, root: str) -> dict[str, Stored]:
        async def work() -> dict[str, Stored]:
            kv = await self._bucket("units")
            watcher = await kv.watch(f"{digest(root)}.>", ignore_deletes=True)
            found: dict[str, Stored] = {}
            try:
                while (entry := await watcher.updates(self._timeout)) is not None:  # type: ignore[no-untyped-call]
                    where = f"{self.shown} {self._prefix}-units {entry.key}"
                    unit, stored = decode_history(entry.value or b"", entry.revision or 0, where)
                    found[unit] = stored
            finally:
                await watcher.stop()  # type: ignore[no-untyped-call]
            return found

        return self._call(work)

    def commit(self, lease: Lease, write: Write) -> int:
        root = digest(lease.root)

        async def work() -> int:
            units, events = await self._bucket("units"), await self._bucket("events")
            if write.event is not None:
                await _put_body(events, f"{root}.{write.event[0]}", write.event[1])
            key = f"{root}.{digest(write.unit)}"
            value = encode_history(write.unit, write.history, write.undelivered)
            try:
                if write.revision == 0:
                    revision = await units.create(key, value)
                else:
                    revision = await units.update(key, value, last=write.revision)
            except KeyWrongLastSequenceError:
                raise Conflict(write.unit, await self._current(units, key)) from None
            for event_id in write.forget:
                await _purge_body(events, f"{root}.{event_id}")
            return revision

        return self._call(work)

    async def _current(self, units: KeyValue, key: str) -> Stored | None:
        try:
            entry = await units.get(key)
        except KeyNotFoundError:
            return None
        where = f"{self.shown} {self._prefix}-units {key}"
        return decode_history(entry.value or b"", entry.revision or 0, where)[1]

    def events(self, root: str, ids: Collection[str]) -> Mapping[str, bytes]:
        async def work() -> dict[str, bytes]:
            kv = await self._bucket("events")
            found: dict[str, bytes] = {}
            for event_id in ids:
                body = await _get_body(kv, f"{digest(root)}.{event_id}")
                if body is not None:
                    found[event_id] = body
            return found

        return self._call(work)

    # -- closing ---------------------------------------------------------------------------------

    def close(self) -> None:
        self._loop.close(self._close, self._timeout + 1)

    async def _close(self) -> None:
        client, self._client, self._buckets, self._js = self._client, None, {}, None
        if client is not None and not client.is_closed:
            await client.close()


# -- event bodies in pieces ---------------------------------------------------------------------
# A KV value is one message, and messages are capped (max_payload, 1 MB by default): a body is
# stored as pieces `<key>.0`, `<key>.1`, ..., the first starting with their count (4 bytes).


async def _put_body(kv: KeyValue, key: str, body: bytes) -> None:
    pieces = [body[i : i + BODY_PIECE] for i in range(0, len(body), BODY_PIECE)] or [b""]
    for n, piece in enumerate(pieces):
        head = len(pieces).to_bytes(4, "big") if n == 0 else b""
        await kv.put(f"{key}.{n}", head + piece)


async def _get_body(kv: KeyValue, key: str) -> bytes | None:
    first = await _value(kv, f"{key}.0")
    if first is None or len(first) < 4:
        return None
    parts = [first[4:]]
    for n in range(1, int.from_bytes(first[:4], "big")):
        piece = await _value(kv, f"{key}.{n}")
        if piece is None:  # cut short: not a body that can be sent
            return None
        parts.append(piece)
    return b"".join(parts)


async def _purge_body(kv: KeyValue, key: str) -> None:
    first = await _value(kv, f"{key}.0")
    count = int.from_bytes(first[:4], "big") if first is not None and len(first) >= 4 else 1
    for n in range(count):
        await kv.purge(f"{key}.{n}")


async def _value(kv: KeyValue, key: str) -> bytes | None:
    try:
        entry = await kv.get(key)
    except KeyNotFoundError:
        return None
    return entry.value or b""
