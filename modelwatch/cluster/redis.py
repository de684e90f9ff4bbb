"""The Redis backend: leases with `SET NX PX`, unit histories in hashes, Lua for atomicity.

Keys of one root (the `{...}` hash tag keeps them in one Redis Cluster slot, so a script may
touch all of them)::

    <prefix>:{<root>}:lease    string "<node id>\\t<token>", expiring (PX)
    <prefix>:{<root>}:units    hash unit path -> history document (codec.encode_history)
    <prefix>:{<root>}:revs     hash unit path -> revision (integer)
    <prefix>:{<root>}:events   hash event id -> compressed body of an undelivered event

* acquire: `SET lease value NX PX ms`; when taken, the script returns the holder and `PTTL`
  (a standby tries again when the lease can have run out, not before).
* renew: a script that `PEXPIRE`s the lease only while it still holds our value.
* commit: one script checks the lease holds our value (the fencing token), compares the
  unit's revision, then writes history, revision, the new event body and drops delivered
  bodies, all or nothing.
* release: delete the lease only while it holds our value.

A `rediss://` URL speaks TLS as `tls` says (`modelwatch.redis_tls`); a certificate either
side refuses is reported in the words of `tls.refusal`.
"""

from __future__ import annotations

import secrets
import urllib.parse
from collections.abc import Collection, Mapping
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

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
from modelwatch.redis_tls import connection_options
from modelwatch.tls import ClientTls, refusal

_ACQUIRE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return {1} end
return {0, redis.call('GET', KEYS[1]) or '', redis.call('PTTL', KEYS[1])}
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# KEYS: lease, units, revs, events. ARGV: lease value, unit, expected revision, history,
# new event id ('' for none), its body, then ids of bodies to drop.
_COMMIT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return {-1} end
local rev = tonumber(redis.call('HGET', KEYS[3], ARGV[2]) or '0')
if rev ~= tonumber(ARGV[3]) then return {0, rev, redis.call('HGET', KEYS[2], ARGV[2]) or ''} end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[4])
redis.call('HSET', KEYS[3], ARGV[2], rev + 1)
if ARGV[5] ~= '' then redis.call('HSET', KEYS[4], ARGV[5], ARGV[6]) end
for i = 7, #ARGV do redis.call('HDEL', KEYS[4], ARGV[i]) end
return {1, rev + 1}
"""


class RedisBackend:
    name = "redis"

    def __init__(
        self,
        url: str,
        *,
        shown: str,
        prefix: str,
        timeout: float,
        tls: ClientTls,
        scrub: Scrubber | None = None,
    ) -> None:
        """`url` may carry credentials (from url_env / url_file): `scrub` removes them from
        every message; `shown` is what messages name instead. `tls` is used for `rediss://`."""
        self.shown = shown
        self._prefix = prefix
        self._tls = tls
        self._host = urllib.parse.urlsplit(url).hostname or ""
        self._scrub = scrub or Scrubber()
        try:
            self._pool = redis.ConnectionPool.from_url(
                url,
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
                protocol=2,  # RESP2: every Redis with scripting
                # a pooled connection closed by a restarted server is reopened once, at once
                retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
                **connection_options(url, tls),
            )
        except ValueError as exc:
            raise BackendUnavailable(f"{shown}: {self._scrub(str(exc))}") from None
        self._client = redis.Redis(connection_pool=self._pool)
        self._acquire = self._client.register_script(_ACQUIRE)
        self._renew = self._client.register_script(_RENEW)
        self._release = self._client.register_script(_RELEASE)
        self._commit = self._client.register_script(_COMMIT)

    def _key(self, root: str, what: str) -> str:
        return f"{self._prefix}:{{{root}}}:{what}"

    def _run(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        try:
            return script(keys=keys, args=args)
        except redis.RedisError as exc:
            raise self._failure(exc) from None

    def _failure(self, exc: Exception) -> BackendUnavailable:
        text = refusal(exc, self._tls, self._host) or str(exc) or type(exc).__name__
        return BackendUnavailable(f"{self.shown}: {self._scrub(text)}")

    # -- leases ----------------------------------------------------------------------------

    def acquire(self, root: str, node: str, seconds: float) -> Lease | Busy:
        token = secrets.token_hex(8)
        value = f"{node}\t{token}"
        reply = self._run(self._acquire, [self._key(root, "lease")], [value, _ms(seconds)])
        if reply[0] == 1:
            return Lease(root, node, token, seconds)
        holder = _text(reply[1]).partition("\t")[0] or None
        pttl = int(reply[2])
        return Busy(holder, pttl / 1000 if pttl >= 0 else None)

    def renew(self, lease: Lease) -> Lease:
        value = f"{lease.node}\t{lease.token}"
        args = [value, _ms(lease.seconds)]
        if not self._run(self._renew, [self._key(lease.root, "lease")], args):
            raise LeaseLost(f"{lease.root}: the lease is no longer ours")
        return lease

    def release(self, lease: Lease) -> None:
        value = f"{lease.node}\t{lease.token}"
        self._run(self._release, [self._key(lease.root, "lease")], [value])

    def holder(self, root: str) -> str | None:
        try:
            value = self._client.get(self._key(root, "lease"))
        except redis.RedisError as exc:
            raise self._failure(exc) from None
        if value is None:
            return None
        return _text(value).partition("\t")[0] or None

    # -- histories and events ----------------------------------------------------------------

    def load(self, root: str) -> dict[str, Stored]:
        try:
            with self._client.pipeline(transaction=True) as pipe:  # MULTI: one consistent view
                pipe.hgetall(self._key(root, "units"))
                pipe.hgetall(self._key(root, "revs"))
                units, revs = pipe.execute()
        except redis.RedisError as exc:
            raise self._failure(exc) from None
        found: dict[str, Stored] = {}
        for field, data in units.items():
            where = f"{self.shown} {self._key(root, 'units')}[{_text(field)!r}]"
            unit, stored = decode_history(data, int(revs.get(field, 0)), where)
            found[unit] = stored
        return found

    def commit(self, lease: Lease, write: Write) -> int:
        root = lease.root
        keys = [self._key(root, k) for k in ("lease", "units", "revs", "events")]
        event_id, body = write.event if write.event is not None else ("", b"")
        history = encode_history(write.unit, write.history, write.undelivered)
        value = f"{lease.node}\t{lease.token}"
        args = [value, write.unit, write.revision, history, event_id, body, *write.forget]
        reply = self._run(self._commit, keys, args)
        if reply[0] == -1:
            raise LeaseLost(f"{root}: the lease is no longer ours")
        if reply[0] == 0:
            current = None
            if reply[2]:
                where = f"{self.shown} {keys[1]}[{write.unit!r}]"
                current = decode_history(reply[2], int(reply[1]), where)[1]
            raise Conflict(write.unit, current)
        return int(reply[1])

    def events(self, root: str, ids: Collection[str]) -> Mapping[str, bytes]:
        wanted = list(ids)
        if not wanted:
            return {}
        try:
            bodies = self._client.hmget(self._key(root, "events"), wanted)
        except redis.RedisError as exc:
            raise self._failure(exc) from None
        return {i: _raw(b) for i, b in zip(wanted, bodies, strict=True) if b is not None}

    def close(self) -> None:
        self._client.close()
        self._pool.disconnect()


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _raw(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
