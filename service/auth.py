"""API keys: creation, hashing, lookup with a short cache, bootstrap.

A key looks like ``fe_<key id>_<secret>``. The key id (8 hex digits) is a
public handle that `keys list` shows and `keys revoke` takes; the secret is 32
random bytes. Only the SHA-256 of the whole key is stored: keys are
high-entropy, so a slow password hash would add nothing but latency.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import time
from dataclasses import dataclass

from service.domain import RateLimit, now_us
from service.store import ApiKeyRecord, Store

log = logging.getLogger(__name__)

READ, WRITE = "events:read", "events:write"
DELETE_PEOPLE = "people:delete"
SCOPES = frozenset({READ, WRITE, DELETE_PEOPLE})
# What a bootstrap key may do: read and write events (deleting people is granted by hand).
BOOTSTRAP_SCOPES = frozenset({READ, WRITE})
BOOTSTRAP_WORKSPACE = "ws_default"
BOOTSTRAP_KEY_PREFIX = "boot"
WORKSPACE_ID = re.compile(r"ws_[a-z0-9_]{1,60}")


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the key's workspace and scopes."""

    workspace_id: str
    key_id: str
    scopes: frozenset[str]
    limit: RateLimit | None = None  # the workspace's ingest limit, looked up with the key


class AuthError(Exception):
    def __init__(self, unauthenticated: bool, message: str) -> None:
        super().__init__(message)
        self.unauthenticated = unauthenticated  # else: permission denied


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> tuple[str, str]:
    """A fresh (key_id, key)."""
    key_id = secrets.token_hex(4)
    return key_id, f"fe_{key_id}_{secrets.token_urlsafe(32)}"


def parse_scopes(text: str) -> frozenset[str]:
    scopes = frozenset(s.strip() for s in text.split(",") if s.strip())
    unknown = scopes - SCOPES
    if unknown or not scopes:
        raise ValueError(f"scopes must be a comma-separated subset of {', '.join(sorted(SCOPES))}")
    return scopes


def check_workspace_id(workspace_id: str) -> str:
    if not WORKSPACE_ID.fullmatch(workspace_id):
        raise ValueError("a workspace id is ws_ followed by 1 to 60 lowercase letters, digits or underscores")
    return workspace_id


async def create_key(store: Store, workspace_id: str, scopes: frozenset[str]) -> tuple[ApiKeyRecord, str]:
    """Create a key (and its workspace if needed); returns the record and the key, shown once."""
    await store.ensure_workspace(check_workspace_id(workspace_id), now_us())
    key_id, key = new_key()
    record = ApiKeyRecord(key_id, hash_key(key), workspace_id, scopes, now_us())
    await store.put_key(record)
    return record, key


async def ensure_bootstrap_key(store: Store, key: str) -> None:
    """Make ws_default exist with exactly this key (events:read and events:write) among bootstrap keys.

    Keys an earlier FLAMEUP_BOOTSTRAP_KEY made are revoked when the value
    changes; keys made with the CLI are left alone. A bootstrap key that was
    revoked by hand stays revoked: revocation is never undone silently.
    """
    if len(key) < 16:
        raise ValueError("FLAMEUP_BOOTSTRAP_KEY must be at least 16 characters")
    await store.ensure_workspace(BOOTSTRAP_WORKSPACE, now_us())
    key_hash = hash_key(key)
    existing = await store.key_by_hash(key_hash)
    if existing is None:
        key_id = f"{BOOTSTRAP_KEY_PREFIX}{key_hash[:8]}"
        await store.put_key(ApiKeyRecord(key_id, key_hash, BOOTSTRAP_WORKSPACE, BOOTSTRAP_SCOPES, now_us()))
        log.info("bootstrap key %s created for %s", key_id, BOOTSTRAP_WORKSPACE)
    elif existing.workspace_id != BOOTSTRAP_WORKSPACE or existing.scopes != BOOTSTRAP_SCOPES:
        raise ValueError(
            f"FLAMEUP_BOOTSTRAP_KEY is already key {existing.key_id} of {existing.workspace_id} "
            "with other scopes; choose another value"
        )
    elif existing.revoked:
        log.warning("bootstrap key %s was revoked; it stays revoked", existing.key_id)
    for old in await store.list_keys(BOOTSTRAP_WORKSPACE):
        if old.key_id.startswith(BOOTSTRAP_KEY_PREFIX) and old.key_hash != key_hash and not old.revoked:
            await store.revoke_key(old.key_id, now_us())
            log.info("earlier bootstrap key %s revoked", old.key_id)


class Authenticator:
    """Turns an `authorization` value into a Principal.

    Known keys are cached for ``cache_seconds``, with their workspace's ingest
    limit, so the hot path does not read the store on every call; a revocation
    or a new limit therefore takes effect within that time in every process.
    Unknown keys are never cached.
    """

    def __init__(self, store: Store, cache_seconds: float = 10.0, clock=time.monotonic) -> None:
        self._store = store
        self._ttl = cache_seconds
        self._clock = clock
        self._cache: dict[str, tuple[float, ApiKeyRecord, RateLimit | None]] = {}

    async def authenticate(self, authorization: str | None, scope: str) -> Principal:
        if not authorization:
            raise AuthError(True, "missing API key: send 'authorization: Bearer <key>'")
        scheme, _, key = authorization.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise AuthError(True, "malformed authorization: expected 'Bearer <key>'")
        record, limit = await self._lookup(hash_key(key))
        if record is None:
            raise AuthError(True, "unknown API key")
        if record.revoked:
            raise AuthError(True, "revoked API key")
        if scope not in record.scopes:
            raise AuthError(False, f"this API key lacks the {scope} scope")
        return Principal(record.workspace_id, record.key_id, record.scopes, limit)

    async def _lookup(self, key_hash: str) -> tuple[ApiKeyRecord | None, RateLimit | None]:
        now = self._clock()
        hit = self._cache.get(key_hash)
        if hit is not None and now - hit[0] < self._ttl:
            return hit[1], hit[2]
        record = await self._store.key_by_hash(key_hash)
        if record is None:
            return None, None
        limit = await self._store.rate_limit(record.workspace_id)
        if self._ttl > 0:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[key_hash] = (now, record, limit)
        return record, limit
