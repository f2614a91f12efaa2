"""Unit tests of the core: validation, identity, ids, keys (embedded store only)."""

from __future__ import annotations

import uuid

import pytest

from service import auth, domain
from service.domain import ValidationError
from service.events import EventsCore, ListInput, TrackInput


@pytest.mark.parametrize("text,expected", [
    ("2024-01-15T10:30:00Z", "2024-01-15T10:30:00Z"),
    ("2024-01-15T10:30:00.123Z", "2024-01-15T10:30:00.123000Z"),
    ("2024-01-15t10:30:00.123456789z", "2024-01-15T10:30:00.123456Z"),
    ("2024-01-15T12:30:00+02:00", "2024-01-15T10:30:00Z"),
    ("2024-01-15T05:00:00-05:30", "2024-01-15T10:30:00Z"),
    ("2024-01-15 10:30:00Z", "2024-01-15T10:30:00Z"),
    ("2016-12-31T23:59:60Z", "2017-01-01T00:00:00Z"),
])
def test_rfc3339_parsing(text, expected):
    assert domain.format_timestamp(domain.parse_timestamp("t", text)) == expected


@pytest.mark.parametrize("text", [
    "", "2024-01-15", "2024-01-15T10:30:00", "2024-02-30T00:00:00Z", "2024-01-15T25:00:00Z",
    "2024-01-15T10:30:00+24:00", "1705314600", "2024-01-15T10:30:00.Z", "yesterday", "2024-01-15T10:30:00Z ",
])
def test_rfc3339_rejects(text):
    with pytest.raises(ValidationError) as exc:
        domain.parse_timestamp("events[2].timestamp", text)
    assert exc.value.violations[0].field == "events[2].timestamp"


def test_person_id_is_a_stable_uuid5_per_workspace():
    a = domain.person_id_for("ws_a", "user_123")
    assert a == domain.person_id_for("ws_a", "user_123")
    assert uuid.UUID(a).version == 5
    assert a != domain.person_id_for("ws_b", "user_123")
    assert a == str(uuid.uuid5(domain.PERSON_NAMESPACE, "ws_a\nuser_123"))


def test_event_ids_are_time_ordered_and_unique():
    ids = [domain.new_event_id(1_700_000_000_000_000 + i // 10 * 1000) for i in range(2000)]
    assert all(i.startswith("evt_") and len(i) == 36 and int(i[4:], 16) >= 0 for i in ids)
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


@pytest.mark.parametrize("value,expected", [
    ({"n": 2.0, "f": 99.99, "big": 2.0**60, "neg": -3.0}, '{"n":2,"f":99.99,"big":1.152921504606847e+18,"neg":-3}'),
    ({"a": [1.0, {"b": None, "c": True, "d": "x"}]}, '{"a":[1,{"b":null,"c":true,"d":"x"}]}'),
    (None, "{}"),
])
def test_canonical_parameters(value, expected):
    assert domain.canonical_parameters("parameters", value) == expected


@pytest.mark.parametrize("value,fragment", [
    ([1, 2], "object"),
    ("text", "object"),
    ({"x": float("nan")}, "finite"),
    ({"x": "y" * domain.MAX_PARAMETERS_BYTES}, "bytes"),
])
def test_canonical_parameters_rejects(value, fragment):
    with pytest.raises(ValidationError) as exc:
        domain.canonical_parameters("parameters", value)
    assert fragment in str(exc.value)


def test_depth_counts_containers():
    value: dict = {}
    for _ in range(31):
        value = {"n": value}
    domain.canonical_parameters("p", value)  # 32 deep
    with pytest.raises(ValidationError, match="32 levels"):
        domain.canonical_parameters("p", {"n": value})


def test_prepare_reports_every_violation_with_its_path(sqlite_store):
    core = EventsCore(sqlite_store, clock=lambda: 1_700_000_000_000_000)
    with pytest.raises(ValidationError) as exc:
        core.prepare("ws", TrackInput("", "a\x01", {"x": float("inf")}, "nope"), 1_700_000_000_000_000,
                     prefix="events[7].")
    assert [v.field for v in exc.value.violations] == [
        "events[7].external_id", "events[7].event", "events[7].timestamp", "events[7].parameters"]


def test_future_limit_is_relative_to_receipt():
    received = domain.parse_timestamp("t", "2024-01-01T00:00:00Z")
    assert domain.check_event_time("t", received + domain.MAX_FUTURE_US, received)
    with pytest.raises(ValidationError, match="24 hours"):
        domain.check_event_time("t", received + domain.MAX_FUTURE_US + 1, received)


def test_list_query_defaults_and_external_id_lookup():
    q = EventsCore.list_query("ws_a", ListInput("user_1", id_type="external_id"))
    assert (q.person_id, q.limit, q.offset, q.event) == (domain.person_id_for("ws_a", "user_1"), 50, 0, None)
    pid = str(uuid.uuid4())
    assert EventsCore.list_query("ws_a", ListInput(pid.upper())).person_id == pid


async def test_track_batch_stores_only_valid_events(sqlite_store):
    core = EventsCore(sqlite_store)
    result = await core.track_batch("ws", [TrackInput("u", "ok"), TrackInput("u", ""), TrackInput("u", "ok2")])
    assert result.event_ids[1] == "" and all(result.event_ids[::2])
    assert [(i, v.field) for i, v in result.errors] == [(1, "events[1].event")]
    page = await core.list_person_events("ws", ListInput("u", id_type="external_id"))
    assert page.total == 2


# Keys ----------------------------------------------------------------------

async def test_keys_are_stored_only_as_hashes(sqlite_store):
    record, key = await auth.create_key(sqlite_store, "ws_acme", auth.SCOPES)
    assert key.startswith(f"fe_{record.key_id}_") and len(key) > 40
    assert record.key_hash == auth.hash_key(key) and key not in repr(record)
    assert await sqlite_store.key_by_hash(auth.hash_key(key)) == record


async def test_authenticator_checks_key_scope_and_revocation(sqlite_store):
    record, key = await auth.create_key(sqlite_store, "ws_acme", frozenset({auth.READ}))
    now = [0.0]
    authn = auth.Authenticator(sqlite_store, cache_seconds=10, clock=lambda: now[0])
    principal = await authn.authenticate(f"Bearer {key}", auth.READ)
    assert (principal.workspace_id, principal.key_id) == ("ws_acme", record.key_id)
    assert (await authn.authenticate(f"bearer  {key}", auth.READ)).workspace_id == "ws_acme"
    with pytest.raises(auth.AuthError) as exc:
        await authn.authenticate(f"Bearer {key}", auth.WRITE)
    assert not exc.value.unauthenticated
    for header in (None, "", "Bearer", f"Token {key}", "Bearer fe_x_y"):
        with pytest.raises(auth.AuthError) as exc:
            await authn.authenticate(header, auth.READ)
        assert exc.value.unauthenticated
    await sqlite_store.revoke_key(record.key_id, 1)
    now[0] = 9.0  # still cached: revocation shows once the cache entry expires
    await authn.authenticate(f"Bearer {key}", auth.READ)
    now[0] = 10.5
    with pytest.raises(auth.AuthError, match="revoked"):
        await authn.authenticate(f"Bearer {key}", auth.READ)


async def test_bootstrap_key_is_idempotent_and_replaces_the_previous_one(sqlite_store):
    await auth.ensure_bootstrap_key(sqlite_store, "first-bootstrap-key")
    await auth.ensure_bootstrap_key(sqlite_store, "first-bootstrap-key")
    keys = await sqlite_store.list_keys("ws_default")
    assert len(keys) == 1 and keys[0].scopes == auth.BOOTSTRAP_SCOPES and not keys[0].revoked
    _, cli_key = await auth.create_key(sqlite_store, "ws_default", auth.SCOPES)
    await auth.ensure_bootstrap_key(sqlite_store, "second-bootstrap-key")
    state = {k.key_hash: k.revoked for k in await sqlite_store.list_keys("ws_default")}
    assert state == {auth.hash_key("first-bootstrap-key"): True, auth.hash_key("second-bootstrap-key"): False,
                     auth.hash_key(cli_key): False}
    with pytest.raises(ValueError):
        await auth.ensure_bootstrap_key(sqlite_store, "short")
