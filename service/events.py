"""The use cases: track one event, track a batch, list a person's events, read
the aggregates (a person's summary, a workspace's counts and event names), and
delete a person.

Plain Python in, plain Python out: the servicer adapts protobuf messages to
these calls, and these calls raise ValidationError (bad input) or
StoreUnavailable (retry later).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, overload

from service import domain
from service.domain import (
    CountBucket,
    EventPage,
    EventQuery,
    FieldViolation,
    NameStats,
    StoredEvent,
    ValidationError,
)
from service.store import Store
from service.store.base import retention_cutoff


@dataclass(frozen=True, slots=True)
class TrackInput:
    """One event as a client sent it, before validation."""

    external_id: str
    event: str
    parameters: dict[str, Any] | None = None
    timestamp: str = ""  # RFC 3339; empty means "when received"
    message_id: str = ""  # empty: never deduplicated
    sent_at: str = ""  # RFC 3339, the client's clock when it sent the event; empty: no correction


@dataclass(frozen=True, slots=True)
class TrackResult:
    event_id: str
    person_id: str
    duplicate: bool  # True: nothing was stored; the ids are the original event's


@dataclass(frozen=True, slots=True)
class BatchResult:
    event_ids: list[str]  # in request order, "" where rejected, the original's id for a duplicate
    errors: list[tuple[int, FieldViolation]]  # (index, first violation) per rejected event
    duplicates: list[int]  # indexes of the duplicates, ascending


@dataclass(frozen=True, slots=True)
class ListInput:
    person_ref: str  # a person_id, or an external_id when id_type == "external_id"
    id_type: str = ""
    limit: int | None = None
    offset: int | None = None
    event: str = ""
    # Nanoseconds since the epoch, as the caller sent them: since < until is
    # checked on these, the store is asked in (rounded up) microseconds.
    since_ns: int | None = None
    until_ns: int | None = None
    page_token: str = ""


@dataclass(frozen=True, slots=True)
class ListResult:
    page: EventPage
    next_page_token: str  # "" on the last page


@dataclass(frozen=True, slots=True)
class PersonRef:
    person_ref: str  # a person_id, or an external_id when id_type == "external_id"
    id_type: str = ""


@dataclass(frozen=True, slots=True)
class SummaryInput:
    person_ref: str  # as ListInput
    id_type: str = ""
    since_ns: int | None = None
    until_ns: int | None = None


@dataclass(frozen=True, slots=True)
class PersonSummary:
    person_id: str
    events: list[NameStats]  # most recently seen first


@dataclass(frozen=True, slots=True)
class CountsInput:
    event: str = ""  # empty: every event
    interval: str = ""  # "hour" or "day"
    since_ns: int | None = None
    until_ns: int | None = None


@dataclass(frozen=True, slots=True)
class EventCounts:
    interval: str
    buckets: list[CountBucket]  # every bucket of the range, oldest first, empty ones as zeros

    @property
    def total(self) -> int:
        return sum(b.count for b in self.buckets)


class EventsCore:
    """The use cases over one store. With ``retention_days``, events older than
    the retention (see service.store.base.retention_cutoff) are refused on the
    way in and left out of every read, while the store removes them."""

    def __init__(self, store: Store, clock=domain.now_us, retention_days: int | None = None) -> None:
        self._store = store
        self._clock = clock
        self._retention_days = retention_days

    def prepare(
        self, workspace_id: str, item: TrackInput, received_us: int, prefix: str = "", skew_us: int = 0
    ) -> StoredEvent:
        """Validate one event and turn it into the row every store keeps.

        Collects every violation, each named by its field path under ``prefix``.
        ``skew_us`` corrects the timestamp when the event has no sent_at of its
        own (a batch's sent_at); the event's own sent_at wins over it.
        """
        violations: list[FieldViolation] = []

        def check(fn, *args):
            try:
                return fn(*args)
            except ValidationError as exc:
                violations.extend(exc.violations)
                return None

        external_id = check(domain.check_name, f"{prefix}external_id", item.external_id)
        event = check(domain.check_name, f"{prefix}event", item.event)
        if item.sent_at:
            skew_us = check(domain.clock_skew, f"{prefix}sent_at", item.sent_at, received_us)
        ts_us = received_us
        if item.timestamp:
            field = f"{prefix}timestamp"
            parsed = check(domain.parse_timestamp, field, item.timestamp)
            if parsed is not None and skew_us is not None:
                ts_us = check(domain.check_event_time, field, parsed + skew_us, received_us)
            if ts_us is not None and self._retention_days is not None:
                ts_us = check(
                    _check_retained,
                    field,
                    ts_us,
                    retention_cutoff(received_us, self._retention_days),
                    self._retention_days,
                )
        message_id = check(domain.check_name, f"{prefix}message_id", item.message_id) if item.message_id else None
        parameters = check(domain.canonical_parameters, f"{prefix}parameters", item.parameters)
        if violations:
            raise ValidationError(*violations)
        return StoredEvent(
            event_id=domain.new_event_id(received_us),
            workspace_id=workspace_id,
            person_id=domain.person_id_for(workspace_id, external_id),
            external_id=external_id,
            event=event,
            parameters=parameters,
            timestamp_us=ts_us,
            created_at_us=received_us,
            message_id=message_id,
        )

    async def track(self, workspace_id: str, item: TrackInput) -> TrackResult:
        stored = self.prepare(workspace_id, item, self._clock())
        (original,) = await self._store.append([stored])
        if original is not None:
            return TrackResult(*original, duplicate=True)
        return TrackResult(stored.event_id, stored.person_id, duplicate=False)

    async def track_batch(self, workspace_id: str, items: Sequence[TrackInput], sent_at: str = "") -> BatchResult:
        """Store every valid event of the batch; report the others one by one.

        The batch as a whole must hold 1 to 100 events and a valid ``sent_at``
        (when given), else nothing is stored. Of two events of the batch with
        the same message_id the first is appended and the second answered as
        its duplicate.
        """
        if not domain.MIN_BATCH <= len(items) <= domain.MAX_BATCH:
            raise ValidationError.of(
                "events", f"must hold {domain.MIN_BATCH} to {domain.MAX_BATCH} events, got {len(items)}"
            )
        received_us = self._clock()
        skew_us = domain.clock_skew("sent_at", sent_at, received_us) if sent_at else 0
        accepted: list[tuple[int, StoredEvent]] = []  # (index, event) of the events to append
        copies: list[tuple[int, int]] = []  # (index, index of the batch's first event with its message_id)
        first_of: dict[str, int] = {}
        event_ids: list[str] = []
        errors: list[tuple[int, FieldViolation]] = []
        for index, item in enumerate(items):
            try:
                stored = self.prepare(workspace_id, item, received_us, prefix=f"events[{index}].", skew_us=skew_us)
            except ValidationError as exc:
                errors.append((index, exc.violations[0]))
                event_ids.append("")
                continue
            event_ids.append(stored.event_id)
            if stored.message_id is not None:
                if (first := first_of.get(stored.message_id)) is not None:
                    copies.append((index, first))
                    continue
                first_of[stored.message_id] = index
            accepted.append((index, stored))
        originals = await self._store.append([stored for _, stored in accepted])
        duplicates = []
        for (index, _), original in zip(accepted, originals, strict=True):
            if original is not None:
                event_ids[index] = original[0]
                duplicates.append(index)
        for index, first in copies:
            event_ids[index] = event_ids[first]
            duplicates.append(index)
        return BatchResult(event_ids, errors, sorted(duplicates))

    async def list_person_events(self, workspace_id: str, req: ListInput) -> ListResult:
        q = self.list_query(workspace_id, req)
        asked = q  # page tokens name the filters the caller sent
        if self._retention_days is not None:
            since_us = self._retained(q.since_us)
            if q.until_us is not None and since_us is not None and q.until_us <= since_us:
                return ListResult(EventPage([], 0), "")
            q = dataclasses.replace(q, since_us=since_us)
        page = await self._store.list_events(q)
        more = page.more if q.after is not None else q.offset + len(page.events) < page.total
        return ListResult(page, domain.page_token(asked, page.events[-1]) if more and page.events else "")

    async def delete_person(self, workspace_id: str, req: PersonRef) -> tuple[str, int]:
        """Erase the person's events and what derives from them: (person_id, events removed)."""
        violations: list[FieldViolation] = []
        person_id = _person(workspace_id, req.person_ref, req.id_type, violations)
        if violations:
            raise ValidationError(*violations)
        return person_id, await self._store.delete_person(workspace_id, person_id)

    async def person_summary(self, workspace_id: str, req: SummaryInput) -> PersonSummary:
        violations: list[FieldViolation] = []
        person_id = _person(workspace_id, req.person_ref, req.id_type, violations)
        _check_window(req.since_ns, req.until_ns, violations)
        if violations:
            raise ValidationError(*violations)
        since_us, until_us = self._retained(_micros_ceil(req.since_ns)), _micros_ceil(req.until_ns)
        if since_us is not None and until_us is not None and since_us >= until_us:
            return PersonSummary(person_id, [])
        stats = await self._store.person_summary(workspace_id, person_id, since_us, until_us)
        return PersonSummary(person_id, domain.by_last_seen(stats))

    async def event_counts(self, workspace_id: str, req: CountsInput) -> EventCounts:
        """Every bucket of the range: from the one holding ``since`` to the one
        holding the instant before ``until``."""
        violations: list[FieldViolation] = []
        if req.event:
            _check(violations, domain.check_name, "event", req.event)
        interval_us = domain.INTERVALS.get(req.interval)
        if interval_us is None:
            violations.append(FieldViolation("interval", f"must be hour or day, got {req.interval[:64]!r}"))
        _check_window(req.since_ns, req.until_ns, violations)
        if violations:
            raise ValidationError(*violations)
        assert interval_us is not None
        until_us = self._clock() if req.until_ns is None else _micros_ceil(req.until_ns)
        since_us = until_us - domain.DEFAULT_COUNTS_RANGE_US if req.since_ns is None else req.since_ns // 1000
        first, end = since_us // interval_us, -(-until_us // interval_us)
        if end - first > domain.MAX_COUNT_BUCKETS:
            raise ValidationError.of(
                "since",
                f"the range must hold at most {domain.MAX_COUNT_BUCKETS} buckets"
                f" of an {req.interval}, got {end - first}",
            )
        stored = await self._store.event_counts(
            workspace_id, req.event or None, interval_us, first * interval_us, end * interval_us
        )
        kept_from = self._retained(None)  # buckets before the retention count nothing, even before removal
        found = {b.start_us: b for b in stored if kept_from is None or b.start_us >= kept_from}
        buckets = [
            found.get(start) or CountBucket(start, 0, 0)
            for start in range(first * interval_us, end * interval_us, interval_us)
        ]
        return EventCounts(req.interval, buckets)

    async def event_names(self, workspace_id: str, since_ns: int | None, until_ns: int | None) -> list[NameStats]:
        """Whole UTC hours: from the one holding ``since`` to the one holding the instant before ``until``."""
        violations: list[FieldViolation] = []
        _check_window(since_ns, until_ns, violations)
        if violations:
            raise ValidationError(*violations)
        hour = domain.HOUR_US
        since_us = None if since_ns is None else since_ns // 1000 // hour * hour
        until_us = None if until_ns is None else -(-_micros_ceil(until_ns) // hour) * hour
        since_us = self._retained(since_us)  # a day's start: a whole hour
        if since_us is not None and until_us is not None and since_us >= until_us:
            return []
        return domain.by_last_seen(await self._store.event_names(workspace_id, since_us, until_us))

    def _retained(self, since_us: int | None) -> int | None:
        """``since`` moved up to the retention's cutoff, when there is a retention."""
        if self._retention_days is None:
            return since_us
        cutoff = retention_cutoff(self._clock(), self._retention_days)
        return cutoff if since_us is None else max(since_us, cutoff)

    @staticmethod
    def list_query(workspace_id: str, req: ListInput) -> EventQuery:
        violations: list[FieldViolation] = []
        person_id = _person(workspace_id, req.person_ref, req.id_type, violations)
        limit = domain.DEFAULT_LIMIT if req.limit is None else req.limit
        if not 1 <= limit <= domain.MAX_LIMIT:
            violations.append(FieldViolation("limit", f"must be between 1 and {domain.MAX_LIMIT}, got {limit}"))
        offset = 0 if req.offset is None else req.offset
        if offset < 0:
            violations.append(FieldViolation("offset", f"must not be negative, got {offset}"))
        if req.event:
            _check(violations, domain.check_name, "event", req.event)
        _check_window(req.since_ns, req.until_ns, violations)
        if req.page_token and offset > 0:
            violations.append(FieldViolation("page_token", "cannot be combined with an offset: pass one or the other"))
        if violations:
            raise ValidationError(*violations)
        q = EventQuery(
            workspace_id=workspace_id,
            person_id=person_id,
            limit=limit,
            offset=offset,
            event=req.event or None,
            since_us=_micros_ceil(req.since_ns),
            until_us=_micros_ceil(req.until_ns),
        )
        if req.page_token:
            after = domain.parse_page_token("page_token", req.page_token, q)
            if q.until_us is not None:  # an edited token cannot reach past the window (stores rely on it)
                after = min(after, (q.until_us, ""))
            q = dataclasses.replace(q, after=after)
        return q


def _check_retained(field: str, ts_us: int, cutoff_us: int, days: int) -> int:
    if ts_us < cutoff_us:
        raise ValidationError.of(
            field, f"is older than the {days} days this service keeps events for ({domain.format_timestamp(cutoff_us)})"
        )
    return ts_us


def _check(violations: list[FieldViolation], fn, *args):
    """fn(*args), its violations collected."""
    try:
        return fn(*args)
    except ValidationError as exc:
        violations.extend(exc.violations)
        return None


def _person(workspace_id: str, person_ref: str, id_type: str, violations: list[FieldViolation]) -> str:
    """The person_id a request names (by person_id or by external_id); "" when invalid."""
    id_type = id_type or "person_id"
    if id_type not in domain.ID_TYPES:
        violations.append(
            FieldViolation("id_type", f"must be one of {', '.join(domain.ID_TYPES)}, got {id_type[:64]!r}")
        )
        return ""
    if id_type == "external_id":
        external_id = _check(violations, domain.check_name, "person_id", person_ref)
        return "" if external_id is None else domain.person_id_for(workspace_id, external_id)
    return _check(violations, domain.parse_person_id, "person_id", person_ref) or ""


def _check_window(since_ns: int | None, until_ns: int | None, violations: list[FieldViolation]) -> None:
    if since_ns is not None and until_ns is not None and since_ns >= until_ns:
        violations.append(FieldViolation("since", "must be before until"))


@overload
def _micros_ceil(ns: int) -> int: ...
@overload
def _micros_ceil(ns: None) -> None: ...
def _micros_ceil(ns: int | None) -> int | None:
    """Rounded up, so that `since` and `until` keep their meaning at the store's precision."""
    return None if ns is None else -(-ns // 1000)
