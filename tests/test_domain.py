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
    listed = await core.list_person_events("ws", ListInput("u", id_type="external_id"))
    assert listed.page.total == 2 and listed.next_page_token == ""


# Idempotent ingest and clock correction --------------------------------------

NOW = domain.parse_timestamp("t", "2024-06-01T12:00:00Z")
HOUR = 3_600_000_000


@pytest.mark.parametrize("client_offset_h", [48, -72, 0])
def test_sent_at_shifts_the_timestamp_by_the_clock_error(client_offset_h):
    """A client whose clock runs 48 h ahead (or 72 h behind) sends an event of
    an hour ago by its clock: stored an hour before receipt, never rejected as
    in the future."""
    core = EventsCore(None, clock=lambda: NOW)
    client_now = NOW + client_offset_h * HOUR
    item = TrackInput("u", "e", timestamp=domain.format_timestamp(client_now - HOUR),
                      sent_at=domain.format_timestamp(client_now))
    assert core.prepare("ws", item, NOW).timestamp_us == NOW - HOUR
    assert core.prepare("ws", TrackInput("u", "e", sent_at=domain.format_timestamp(client_now)), NOW).timestamp_us == NOW


def test_the_future_rule_applies_after_the_correction():
    core = EventsCore(None)
    sent_at = domain.format_timestamp(NOW - 10 * HOUR)  # the client's clock is 10 h behind
    ok = TrackInput("u", "e", timestamp=domain.format_timestamp(NOW + 14 * HOUR), sent_at=sent_at)
    assert core.prepare("ws", ok, NOW).timestamp_us == NOW + 24 * HOUR
    late = TrackInput("u", "e", timestamp=domain.format_timestamp(NOW + 14 * HOUR + 1), sent_at=sent_at)
    with pytest.raises(ValidationError, match="events\\[2\\].timestamp: must not be more than 24 hours"):
        core.prepare("ws", late, NOW, prefix="events[2].")


@pytest.mark.parametrize("kw,field", [
    ({"sent_at": "yesterday"}, "events[0].sent_at"),
    ({"message_id": ""}, None),
    ({"message_id": "x" * 256}, "events[0].message_id"),
    ({"message_id": "a\nb"}, "events[0].message_id"),
])
def test_message_id_and_sent_at_are_checked(kw, field):
    core = EventsCore(None)
    item = TrackInput("u", "e", timestamp="2024-06-01T11:00:00Z", **kw)
    if field is None:
        assert core.prepare("ws", item, NOW, prefix="events[0].").message_id is None  # empty: no message_id
        return
    with pytest.raises(ValidationError) as exc:
        core.prepare("ws", item, NOW, prefix="events[0].")
    assert [v.field for v in exc.value.violations] == [field]


async def test_a_batch_sent_at_applies_to_events_without_their_own(sqlite_store):
    core = EventsCore(sqlite_store, clock=lambda: NOW)
    ahead = domain.format_timestamp(NOW + 30 * HOUR)  # the batch's clock: 30 h ahead
    behind = domain.format_timestamp(NOW - 5 * HOUR)  # one event's own clock: 5 h behind
    result = await core.track_batch("ws", [
        TrackInput("u", "a", timestamp=domain.format_timestamp(NOW + 29 * HOUR)),
        TrackInput("u", "b", timestamp=domain.format_timestamp(NOW - 6 * HOUR), sent_at=behind),
    ], sent_at=ahead)
    assert not result.errors
    listed = await core.list_person_events("ws", ListInput("u", id_type="external_id"))
    assert sorted((e.event, e.timestamp_us) for e in listed.page.events) == [("a", NOW - HOUR), ("b", NOW - HOUR)]
    with pytest.raises(ValidationError, match="^sent_at: must be an RFC 3339"):
        await core.track_batch("ws", [TrackInput("u", "a")], sent_at="soon")


async def test_track_and_batch_answer_duplicates(sqlite_store):
    core = EventsCore(sqlite_store)
    first = await core.track("ws", TrackInput("u", "a", message_id="m1"))
    assert not first.duplicate
    again = await core.track("ws", TrackInput("v", "other", message_id="m1"))
    assert again == type(first)(first.event_id, first.person_id, duplicate=True)
    result = await core.track_batch("ws", [
        TrackInput("u", "b", message_id="m2"), TrackInput("u", ""), TrackInput("u", "c", message_id="m1"),
        TrackInput("u", "d", message_id="m2"), TrackInput("u", "e"),
    ])
    assert result.duplicates == [2, 3] and [i for i, _ in result.errors] == [1]
    assert result.event_ids[2] == first.event_id and result.event_ids[3] == result.event_ids[0]
    listed = await core.list_person_events("ws", ListInput("u", id_type="external_id"))
    assert sorted(e.event for e in listed.page.events) == ["a", "b", "e"] and listed.page.total == 3


# Page tokens ------------------------------------------------------------------

def _token_query(**kw):
    return EventsCore.list_query("ws_a", ListInput("user_1", id_type="external_id", **kw))


def _last_event(q):
    return domain.StoredEvent(domain.new_event_id(NOW), "ws_a", q.person_id, "user_1", "e", "{}", NOW - 5, NOW)


def test_a_page_token_round_trips_for_its_own_listing():
    q = _token_query(event="e", since_ns=(NOW - HOUR) * 1000, limit=10)
    last = _last_event(q)
    token = domain.page_token(q, last)
    assert token.isascii() and "=" not in token
    resumed = _token_query(event="e", since_ns=(NOW - HOUR) * 1000, limit=20, page_token=token)  # the limit may change
    assert resumed.after == (last.timestamp_us, last.event_id)


def test_an_edited_cursor_cannot_reach_past_until():
    """The checksum is no secret: a token rebuilt with a later cursor still lists only the window."""
    q = _token_query(until_ns=NOW * 1000)
    late = domain.StoredEvent(domain.new_event_id(NOW), "ws_a", q.person_id, "user_1", "e", "{}", NOW + HOUR, NOW)
    resumed = _token_query(until_ns=NOW * 1000, page_token=domain.page_token(q, late))
    assert resumed.after == (NOW, "")


def _flip(token: str, at: int) -> str:
    return token[:at] + ("A" if token[at] != "A" else "B") + token[at + 1:]


@pytest.mark.parametrize("make_bad,kw,fragment", [
    (lambda t: "not a token!", {}, "not a page token"),
    (lambda t: t[:-4], {}, "not a page token"),
    (lambda t: _flip(t, 30), {}, "damaged or was edited"),
    (lambda t: _flip(t, len(t) - 2), {}, "damaged or was edited"),
    (lambda t: t, {"event": "other"}, "other filters"),
    (lambda t: t, {"until_ns": NOW * 1000}, "other filters"),
    (lambda t: t, {"offset": 5}, "cannot be combined with an offset"),
])
def test_bad_page_tokens_are_field_errors(make_bad, kw, fragment):
    q = _token_query()
    token = make_bad(domain.page_token(q, _last_event(q)))
    with pytest.raises(ValidationError, match=fragment) as exc:
        _token_query(page_token=token, **kw)
    assert [v.field for v in exc.value.violations] == ["page_token"]


def test_a_page_token_is_bound_to_its_person_and_workspace():
    q = _token_query()
    token = domain.page_token(q, _last_event(q))
    with pytest.raises(ValidationError, match="another person"):
        EventsCore.list_query("ws_a", ListInput("user_2", id_type="external_id", page_token=token))
    with pytest.raises(ValidationError, match="page_token: "):
        EventsCore.list_query("ws_b", ListInput(q.person_id, page_token=token))


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
    assert len(keys) == 1 and keys[0].scopes == auth.SCOPES and not keys[0].revoked
    _, cli_key = await auth.create_key(sqlite_store, "ws_default", auth.SCOPES)
    await auth.ensure_bootstrap_key(sqlite_store, "second-bootstrap-key")
    state = {k.key_hash: k.revoked for k in await sqlite_store.list_keys("ws_default")}
    assert state == {auth.hash_key("first-bootstrap-key"): True, auth.hash_key("second-bootstrap-key"): False,
                     auth.hash_key(cli_key): False}
    with pytest.raises(ValueError):
        await auth.ensure_bootstrap_key(sqlite_store, "short")
